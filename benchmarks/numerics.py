"""What train.numerics=portable costs and what it buys: per-epoch wall time of portable against native, and the
weights hash of each mode: native as it is and with oneDNN capped at AVX2 (what oneDNN picks on an AVX2-only
CPU), portable as it is and started from a shell that asks oneDNN for AVX-512 BF16.

Each measurement is a fresh process that calls imgclf.train.train() (the pipeline as `imgclf train` runs it, a
private MLflow store) for --epochs epochs; the first epoch (tracing) is not timed and the others' median is.
Configurations are interleaved and repeated (--repeats), so load from other processes hits each alike.

- report: the default params (digits, the report's net) on data/prepared (run `dvc repro prepare` first).
- fast: the `fast` preset on the 45,000 lossless CIFAR-10 training images (prepared by
  benchmarks/time_to_accuracy.py into benchmarks/.cache/prepared-png; ~3 min an epoch natively here); skipped
  when that folder is missing.

A native hash that changes with the cap shows that oneDNN's ISA is felt; a portable hash that does not change
with what the shell asks shows that the mode pins it. `native, AVX2 path` runs native as TensorFlow does on an
AVX2-only CPU (its oneDNN ops off, oneDNN's sgemm at AVX2): portable's cost there is its ratio to that row.
`portable, Zen 3's cache sizes` pins Eigen's L2 to 512 KB, as a Zen 3 reads it: its hash is the one a Zen 3
gives in portable mode (docs/reproducibility.md).

    python benchmarks/numerics.py [--epochs 3] [--repeats 1] [--only report|fast]
    python benchmarks/numerics.py --modes native portable --repeats 3   # timing only, more repeats
    python benchmarks/numerics.py --only report --modes native "native, AVX2 path" portable --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, child_env, cpu_header

PREPARED = {"report": REPO / "data" / "prepared", "fast": REPO / "benchmarks" / ".cache" / "prepared-png"}
# name -> (train.numerics, extra environment for the child)
MODES = {
    "native": ("native", {}),
    "native, oneDNN capped at AVX2": ("native", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "portable": ("portable", {}),
    # portable sets its own cap: what the shell asks for must not matter
    "portable, shell asks for AVX-512 BF16": ("portable", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}),
    # native as an AVX2-only CPU runs it: TensorFlow leaves its oneDNN ops off there (the contractions' sgemm is
    # still oneDNN's, at AVX2). Portable's own settings already are these, so its runs serve both comparisons.
    "native, AVX2 path": ("native", {"TF_ENABLE_ONEDNN_OPTS": "0", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    # portable with Eigen's L2 pinned to a Zen 3's 512 KB (eigen_cache.SIZES_ENV): its hash is that CPU's
    "portable, Zen 3's cache sizes": ("portable", {"IMGCLF_EIGEN_CACHE_SIZES": "32768,524288,268435456"}),
}


def child(preset: str, mode: str, epochs: int) -> dict:
    """One training run in this fresh process; per-epoch seconds and losses from MLflow, the weights hash."""
    from imgclf.training.numerics import use_numerics

    use_numerics(mode)  # before anything imports TensorFlow, as `imgclf train` does
    from imgclf.config import load_params
    from imgclf.experiments.presets import PRESETS

    sets = PRESETS["fast"].overrides if preset == "fast" else {}
    # float32 in both modes: the fast preset's `auto` would train native runs in bfloat16 on a bf16 CPU
    sets |= {"train.training_epochs": epochs, "train.numerics": mode, "train.mixed_precision": "none"}
    params = load_params(REPO / "params.yaml", [f"{k}={v}" for k, v in sets.items()])
    with tempfile.TemporaryDirectory(prefix="imgclf-numerics-bench-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)  # MLflow puts a sqlite store's artifacts under ./mlruns: here, not in the caller's folder
        from mlflow.tracking import MlflowClient

        from imgclf.tracking.keys import metric_history
        from imgclf.train import train

        out = Path(tmp)
        summary = train(params, PREPARED[preset], out / "model.keras", out, out / "checkpoint")
        client = MlflowClient()
        history = {key: [m.value for m in sorted(metric_history(client, summary["mlflow_run_id"], key),
                                                   key=lambda m: m.step)] for key in ("epoch_seconds", "loss")}
    return {"weights_sha256": summary["weights_sha256"], **history}


def measure(preset: str, name: str, epochs: int) -> dict:
    """`child` in a fresh process started with the mode's extra environment."""
    mode, env = MODES[name]
    proc = subprocess.run([sys.executable, __file__, "--child", preset, mode, str(epochs)],
                          capture_output=True, text=True, env={**child_env(), **env})
    if proc.returncode != 0:
        raise SystemExit(f"{preset} / {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(preset: str, runs: dict[str, list[dict]]) -> list[str]:
    """Rows per mode: median s/epoch after the first, ratio to native, hash, first-epoch loss."""
    per_epoch = {name: statistics.median(s for r in rs for s in r["epoch_seconds"][1:]) for name, rs in runs.items()}
    lines = [f"\n{preset}: | mode | s / epoch (median, epochs 2+) | x native | weights sha256 | epoch-1 loss |",
             "|---|---|---|---|---|"]
    for name, rs in runs.items():
        hashes = sorted({r["weights_sha256"][:12] for r in rs})
        lines.append(f"| {name} | {per_epoch[name]:.1f} | {per_epoch[name] / per_epoch['native']:.2f} "
                     f"| {', '.join(hashes)} | {rs[0]['loss'][0]:.6f} |")
    for mode in ("native", "portable"):
        both = [r for name, rs in runs.items() if name.split(",")[0] == mode and "Zen 3" not in name for r in rs]
        lines.append(f"{mode}: {len({r['weights_sha256'] for r in both})} hash(es) over its {len(both)} runs")
    if "portable" in per_epoch and "native, AVX2 path" in per_epoch:
        lines.append(f"portable / native on the emulated AVX2 path: "
                     f"{per_epoch['portable'] / per_epoch['native, AVX2 path']:.2f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed (default 3)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=sorted(PREPARED), nargs="+", default=sorted(PREPARED, reverse=True))
    parser.add_argument("--modes", choices=list(MODES), nargs="+", default=list(MODES))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return 0
    print(cpu_header(), flush=True)
    for preset in args.only:
        if not (PREPARED[preset] / "manifest.json").is_file():
            print(f"\n{preset}: skipped, {PREPARED[preset]} has no prepared data")
            continue
        runs: dict[str, list[dict]] = {name: [] for name in args.modes}
        for _ in range(args.repeats):
            for name in args.modes:
                runs[name].append(measure(preset, name, args.epochs))
                print(f"{preset} / {name}: {runs[name][-1]}", flush=True)
        print("\n".join(table(preset, runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
