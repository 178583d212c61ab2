"""Time to accuracy on the real CIFAR-10 training images: the fast presets (airbench94's Nesterov SGD,
airbench94_muon's Muon) in float32 and mixed_bfloat16 against each other and the report's net, through the
pipeline's own train() and evaluate().

Data: ../shared/data/cifar10-train-png.tar.gz (the 50,000 training images with their exact pixels, as lossless
PNG class folders; --data jpg for the lossy JPEG re-encoding of the same images), prepared by the pipeline's
folder source into the usual seeded 45,000 / 5,000 train/dev split. Each run is a fresh
process that calls imgclf.train.train() and imgclf.evaluate.evaluate() with a private MLflow store, then
reads the per-epoch wall time and dev metrics back from MLflow. Results go to a JSON file as each run
ends (--results), so a long benchmark can be stopped and resumed; the summary is printed from that file.

For each configuration: per-epoch wall time, dev accuracy and macro-F1 per epoch, the wall time at which
dev accuracy first reached the target (0.93), and the final dev accuracy with the preset's TTA (medians
over seeds); the report's net's dev accuracy after the same wall time (its last epoch that ended within
it); FLOPs per trained image of both nets (6 x the multiply-adds of a forward pass); and fast-muon's
training time as a ratio of fast-float32's (target <= 0.6) with the accuracy it gives up (target <= 0.003);
fast-muon-bf16's whole wall time (the fresh process: imports, train, save, evaluate with TTA) against
fast-float32's (target <= 0.6), its accuracy against the bar for making bfloat16 the presets' default (median
>= 0.935, each seed >= 0.93), and every configuration's GFLOP/s in the training steps as a share of the CPU's
peak in its precision (benchmarks/peak.py says how the peak is estimated; target >= 60 % in bfloat16).
Runs go seed by seed, so a benchmark stopped early still compares configurations on the same seeds.

    python benchmarks/time_to_accuracy.py                    # fast-float32, fast-muon, fast-muon-bf16 runs not yet done
    python benchmarks/time_to_accuracy.py --data jpg         # the same on the JPEG images (their own results)
    python benchmarks/time_to_accuracy.py --only fast-muon-bf16 --seeds 52   # one configuration, one seed
    python benchmarks/time_to_accuracy.py --summary          # print the table from the results file
    python benchmarks/time_to_accuracy.py --epochs 1 --seeds 51 --results /tmp/smoke.json   # a smoke run
    python benchmarks/time_to_accuracy.py --cpu avx2         # fast-muon on an AVX2-only CPU's path, before and now

--cpu avx2 runs the children on an AVX2-only CPU's code path (common.CPU_PATHS; results-DATA-avx2.json): fast-muon
as the pipeline runs it there (train.kernels=auto: oneDNN's ops, Newton-Schulz in float32) against fast-muon-eigen,
what ran there before (TensorFlow's default Eigen kernels, airbench's bfloat16 Newton-Schulz, emulated); target:
the whole run in <= 0.5x the time, at a final dev accuracy (TTA) >= 0.935.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import CPU_PATHS, REPO, cpu_header, measure_child, verdict
from peak import clock_ghz, peak_gflops

DATA = {kind: REPO.parent / "shared" / "data" / f"cifar10-train-{kind}.tar.gz" for kind in ("png", "jpg")}
CACHE = REPO / "benchmarks" / ".cache"  # git-ignored: the extracted images and prepared arrays
TARGET = 0.93
BF16_BAR = (0.935, 0.93)  # fast-muon-bf16's median and per-seed final dev accuracy (TTA) for bf16 by default
F32, BF16 = {"train.mixed_precision": "none"}, {"train.mixed_precision": "mixed_bfloat16"}
# name -> (preset, params overrides, seeds): `imgclf experiments`' presets with the precision pinned (their own
# `auto` would pick by CPU)
RUNS = {
    "fast-float32": ("fast", F32, [51, 52]),
    "fast-muon": ("fast_muon", F32, [51, 52]),
    "fast-muon-bf16": ("fast_muon", BF16, [51, 52]),
    "fast-bf16": ("fast", BF16, [51, 52]),
    # 7 report epochs (~25-40 min here) outlast fast-bf16's training time, which is all the comparison needs
    "report": (None, {"train.training_epochs": 7}, [51]),
    "fast-muon-eigen": ("fast_muon", F32 | {"train.kernels": "eigen", "model.fast.muon.ns_dtype": "bfloat16"}, [51]),
}
# without --only: the table the README quotes, and the AVX2 comparison
DEFAULT = {"this": ("fast-float32", "fast-muon-bf16", "fast-muon"), "avx2": ("fast-muon-eigen", "fast-muon")}
AVX2_BAR = (0.5, 0.935)  # fast-muon's whole run against fast-muon-eigen's on the AVX2 path; its final dev accuracy


def overrides(config: str) -> dict:
    """The params overrides of one configuration: its preset's, then its own."""
    from imgclf.experiments.presets import PRESETS

    preset, own, _ = RUNS[config]
    return (PRESETS[preset].overrides if preset else {}) | own


def schedule(configs: list[str], seeds: list[int] | None) -> list[tuple[str, int]]:
    """(config, seed) pairs seed by seed, so the configurations of a seed run back to back: a benchmark
    stopped early still compares like with like."""
    pairs = [(c, s) for c in configs for s in (seeds or RUNS[c][2])]
    return sorted(pairs, key=lambda pair: (pair[1], configs.index(pair[0])))

def images_dir(kind: str) -> Path:
    """Where the `kind` (png or jpg) images are extracted."""
    return CACHE / ("images" if kind == "jpg" else f"images-{kind}")


def prepared_dir(kind: str) -> Path:
    """The shared `kind` images through the folder source (extracted and prepared once)."""
    out = CACHE / ("prepared" if kind == "jpg" else f"prepared-{kind}")
    if (out / "manifest.json").is_file():
        return out
    if not DATA[kind].is_file():
        raise SystemExit(f"{DATA[kind]}: not found; this benchmark needs the shared CIFAR-10 images")
    images = images_dir(kind)
    if not (images / "train").is_dir():
        with tarfile.open(DATA[kind]) as tar:  # the data filter where this Python has it (3.11.4+)
            tar.extractall(images, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    from imgclf.config import load_params
    from imgclf.prepare import prepare

    params = load_params(REPO / "params.yaml", ["data.dataset=folder", f"data.path={images}"])
    prepare(params, out)
    return out


def forward_macs(model) -> int:
    """Multiply-adds of one image's forward pass through the conv and dense layers."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            h, w, c_out = layer.output.shape[1:]
            total += h * w * c_out * layer.kernel.shape[0] * layer.kernel.shape[1] * layer.kernel.shape[2]
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


def child(config: str, seed: int, prepared: str, epochs: int, kind: str) -> dict:
    """One training run of the pipeline in this fresh process; its per-epoch history and final metrics.
    epochs > 0 replaces the configuration's epochs (a smoke run)."""
    import os

    sets = overrides(config) | ({"train.training_epochs": epochs} if epochs > 0 else {})
    with tempfile.TemporaryDirectory(prefix="imgclf-tta-bench-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)  # MLflow puts a sqlite store's artifacts under ./mlruns: here, not in the caller's folder
        from imgclf.config import load_params
        from imgclf.training.numerics import use_numerics

        sets = [f"{k}={v}" for k, v in (sets | {"seed": seed}).items()]
        params = load_params(REPO / "params.yaml", sets + ["data.dataset=folder", f"data.path={images_dir(kind)}"])
        use_numerics(params["train"]["numerics"], params["train"]["kernels"])  # before TensorFlow, as `imgclf train`
        from mlflow.tracking import MlflowClient

        from imgclf.evaluate import evaluate
        from imgclf.tracking.keys import metric_history
        from imgclf.train import train

        out = Path(tmp)
        summary = train(params, prepared, out / "model.keras", out, out / "checkpoint")
        metrics = evaluate(params, prepared, out / "model.keras", out)
        client = MlflowClient()
        history = {key: {m.step: m.value for m in metric_history(client, summary["mlflow_run_id"], key)}
                   for key in ("epoch_seconds", "dev_accuracy", "dev_f1_macro", "loss")}
        from imgclf.files import modelfile

        macs = forward_macs(modelfile.load(out / "model.keras"))
        kernels = client.get_run(summary["mlflow_run_id"]).data.tags.get("kernels")
        from imgclf.training.families.fast import newton_schulz_dtype

        ns_dtype = newton_schulz_dtype(params)  # in this process, as the family resolved it for the run
    epochs = sorted(history["epoch_seconds"])
    train_images = json.loads((Path(prepared) / "manifest.json").read_text())["splits"]["train"]["count"]
    return {"config": config, "seed": seed, "macs": macs, "train_seconds": summary["train_seconds"],
            "train_images": train_images, "precision": params["train"]["mixed_precision"],
            "epochs": [{"epoch": e, **{k: history[k][e] for k in history}} for e in epochs],
            "final_dev_accuracy": metrics["dev"]["accuracy"], "final_dev_f1": metrics["dev"]["f1_macro"],
            "tta": params["evaluate"]["tta"], "device": summary["device"], "data": kind,
            "path": f"{kernels} kernels, Newton-Schulz in {ns_dtype}, "
                    f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}"}


def time_to(epochs: list[dict], target: float) -> float | None:
    """Wall seconds (cumulative epoch time) when dev accuracy first reached `target`, else None."""
    elapsed = 0.0
    for row in epochs:
        elapsed += row["epoch_seconds"]
        if row["dev_accuracy"] >= target:
            return elapsed
    return None


def accuracy_within(epochs: list[dict], seconds: float) -> tuple[int, float] | None:
    """(epoch, dev accuracy) of the last epoch that ended within `seconds`."""
    elapsed, found = 0.0, None
    for row in epochs:
        elapsed += row["epoch_seconds"]
        if elapsed <= seconds:
            found = (row["epoch"], row["dev_accuracy"])
    return found


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".3f", none: str = "not reached", unit: str = "") -> str:
    """value formatted by spec and followed by unit, or `none`."""
    return none if value is None else format(value, spec) + unit


def steps_gflops(r: dict) -> float:
    """GFLOP/s in the training steps: 6 x forward multiply-adds x images/s (epochs after the first, which
    traces)."""
    seconds = statistics.median(e["epoch_seconds"] for e in r["epochs"][1:] or r["epochs"])
    return 6 * r["macs"] * r["train_images"] / seconds / 1e9


def row(config: str, runs: list[dict]) -> str:
    """One configuration's table row (medians over its seeds)."""
    per_epoch = median([statistics.median(e["epoch_seconds"] for e in r["epochs"]) for r in runs])
    outside = median([r["train_seconds"] - sum(e["epoch_seconds"] for e in r["epochs"]) for r in runs])
    reach = [time_to(r["epochs"], TARGET) for r in runs]
    gflops = median([steps_gflops(r) for r in runs])
    peak = peak_gflops(runs[0]["precision"], median([r.get("clock_ghz") for r in runs]))
    return (f"| {config} | {', '.join(str(r['seed']) for r in runs)} | {per_epoch:.0f} | {outside:.0f} s "
            f"| {median([r['train_seconds'] for r in runs]) / 60:.1f} min "
            f"| {fmt(median([r.get('wall_seconds', 0) / 60 for r in runs]), '.1f', 'n/a')} min "
            f"| {fmt(median(reach) if all(t is not None for t in reach) else None, '.0f', unit=' s')} "
            f"({', '.join(fmt(t, '.0f', unit=' s') for t in reach)}) "
            f"| {fmt(median([r['final_dev_accuracy'] for r in runs]), '.4f')} "
            f"({', '.join(format(r['final_dev_accuracy'], '.4f') for r in runs)}) "
            f"| {fmt(median([r['final_dev_f1'] for r in runs]), '.4f')} "
            f"| {gflops:.0f} ({fmt(peak and gflops / peak, '.0%', 'n/a')} of {fmt(peak, '.0f', 'n/a')}) |")


def ratio_verdict(by_config: dict[str, list[dict]], config: str, key: str, what: str) -> list[str]:
    """`config` against fast-float32 on the seeds both ran: the ratio of `key` (target <= 0.6) and the
    accuracy it gives up (target <= 0.003)."""
    fast, other = ({r["seed"]: r for r in by_config.get(c, [])} for c in ("fast-float32", config))
    seeds = sorted(set(fast) & set(other))
    if not seeds or any(other[s].get(key) is None or fast[s].get(key) is None for s in seeds):
        return []
    ratio = median([other[s][key] for s in seeds]) / median([fast[s][key] for s in seeds])
    gap = median([other[s]["final_dev_accuracy"] for s in seeds]) - median([fast[s]["final_dev_accuracy"] for s in seeds])
    return [f"\n{config} / fast-float32 {what} (seeds {', '.join(map(str, seeds))}, medians): {ratio:.3f} "
            f"{verdict(ratio, 0.6, higher_is_better=False)}; final dev accuracy (TTA) {gap:+.4f} "
            f"{verdict(gap, -0.003)}"]


def bf16_verdicts(by_config: dict[str, list[dict]]) -> list[str]:
    """fast-muon-bf16 against the bar for bfloat16 by default, and its share of the bfloat16 peak."""
    runs = by_config.get("fast-muon-bf16", [])
    if not runs:
        return []
    accs = [r["final_dev_accuracy"] for r in runs]
    peak = peak_gflops("mixed_bfloat16", median([r.get("clock_ghz") for r in runs]))
    if not peak:
        return []
    share = median([steps_gflops(r) for r in runs]) / peak
    return [f"\nfast-muon-bf16 final dev accuracy (TTA): median {median(accs):.4f} "
            f"{verdict(median(accs), BF16_BAR[0])}, lowest seed {min(accs):.4f} {verdict(min(accs), BF16_BAR[1])} "
            f"({len(runs)} seed(s)); GFLOP/s in the steps {share:.0%} of the bfloat16 peak {verdict(share, 0.6)}"]


def avx2_verdicts(by_config: dict[str, list[dict]]) -> list[str]:
    """fast-muon against fast-muon-eigen (--cpu avx2): the whole run's time and the accuracy it keeps."""
    before, now = ({r["seed"]: r for r in by_config.get(c, [])} for c in ("fast-muon-eigen", "fast-muon"))
    seeds = sorted(set(before) & set(now))
    if not seeds:
        return []
    ratio = median([now[s]["wall_seconds"] for s in seeds]) / median([before[s]["wall_seconds"] for s in seeds])
    acc = median([now[s]["final_dev_accuracy"] for s in seeds])
    return [f"\nfast-muon ({now[seeds[0]].get('path')}) / fast-muon-eigen ({before[seeds[0]].get('path')}), whole run "
            f"(seeds {', '.join(map(str, seeds))}, medians): {ratio:.3f} {verdict(ratio, AVX2_BAR[0], False)}; "
            f"fast-muon final dev accuracy (TTA) {acc:.4f} {verdict(acc, AVX2_BAR[1])}"]


def summary(results: list[dict]) -> str:
    """The table printed at the end (medians over seeds). 'outside steps': training time not spent in an
    epoch's training steps (building, whitening, the per-epoch dev pass, checkpoint and MLflow logging);
    'whole run': the fresh process from start to end (imports, train, saving and logging the model, evaluate
    with TTA)."""
    lines = ["| configuration | seeds | s / epoch (steps) | outside steps | training time | whole run "
             "| time to dev acc >= 0.93 | final dev acc (TTA) | final dev macro-F1 | GFLOP/s in steps (of peak) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["config"], []).append(r)
    lines += [row(config, runs) for config, runs in by_config.items()]
    first = results[0] if results else None
    if first:
        lines.append(f"\nGFLOP per trained image: {6 * first['macs'] / 1e9:.2f}; clock {fmt(first.get('clock_ghz'), '.2f', 'n/a')} GHz "
                     "(benchmarks/peak.py)")
    for config, runs in by_config.items():
        for r in runs:
            curve = ", ".join(f"{e['dev_accuracy']:.3f}" for e in r["epochs"])
            lines.append(f"\n{config} seed {r['seed']} dev accuracy per epoch: {curve}")
    lines += ratio_verdict(by_config, "fast-muon", "train_seconds", "training time")
    lines += ratio_verdict(by_config, "fast-muon-bf16", "wall_seconds", "whole run")
    lines += bf16_verdicts(by_config)
    lines += avx2_verdicts(by_config)
    fast_time = median([r["train_seconds"] for r in by_config.get("fast-muon-bf16", [])])
    for r in by_config.get("report", []):
        reached = accuracy_within(r["epochs"], fast_time) if fast_time else None
        lines.append(f"\nreport seed {r['seed']}: dev accuracy {fmt(reached and reached[1], '.4f', 'n/a')} after "
                     f"epoch {reached and reached[0]} within fast-muon-bf16's median training time "
                     f"({fmt(fast_time, '.0f', 'n/a', ' s')})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=5, metavar=("CONFIG", "SEED", "PREPARED", "EPOCHS", "DATA"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--data", choices=sorted(DATA), default="png",
                        help="png: the exact pixels (accuracy figures); jpg: the lossy re-encoding")
    parser.add_argument("--only", nargs="+", choices=list(RUNS),
                        help=f"configurations to run (default: {DEFAULT})")
    parser.add_argument("--cpu", choices=sorted(CPU_PATHS), default="this", help="whose code path (common.CPU_PATHS)")
    parser.add_argument("--results", type=Path, help="default: benchmarks/.cache/results-DATA.json")
    parser.add_argument("--summary", action="store_true", help="print the table from --results, run nothing")
    parser.add_argument("--epochs", type=int, default=0,
                        help="train every configuration this many epochs instead (a smoke run: use its own --results)")
    parser.add_argument("--seeds", type=int, nargs="+", help="these seeds instead of each configuration's")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], int(args.child[3]), args.child[4])))
        return 0
    args.results = args.results or CACHE / f"results-{args.data}{'' if args.cpu == 'this' else '-' + args.cpu}.json"
    ghz = clock_ghz()
    print(f"{cpu_header(args.cpu)}, clock {fmt(ghz, '.2f', 'not measured')} GHz", flush=True)
    results = json.loads(args.results.read_text()) if args.results.is_file() else []
    if not args.summary:
        prepared = prepared_dir(args.data)
        done = {(r["config"], r["seed"]) for r in results}
        for config, seed in schedule(args.only or list(DEFAULT[args.cpu]), args.seeds):
            if (config, seed) in done:
                continue
            print(f"running {config} seed {seed} ...", flush=True)
            start = time.perf_counter()
            result = measure_child(__file__, [config, str(seed), str(prepared), str(args.epochs), args.data], args.cpu)
            results.append(result | {"wall_seconds": time.perf_counter() - start, "clock_ghz": ghz})
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1))
            print(summary(results), flush=True)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
