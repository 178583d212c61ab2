"""What the benchmarks share: one measurement per fresh process, and the verdict on a target."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The lossless CIFAR-10 PNGs through the folder source: time_to_accuracy.py prepares them, others reuse them.
PREPARED_PNG = REPO / "benchmarks" / ".cache" / "prepared-png"


def png_subset_args(doc: str, configs: list[str], images: int, extra=lambda parser: None, child=None):
    """The command line of a benchmark that trains CONFIGs on the first --images prepared PNGs for --epochs:
    parsed args, or None after running `child(config, images, epochs)` when called as a --child (its JSON
    printed). `extra` adds the benchmark's own options; the prepared PNGs must be there otherwise."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--epochs", type=int, default=3, help="including the untimed first epoch")
    parser.add_argument("--only", nargs="+", choices=configs, default=configs, help="configurations to run")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "IMAGES", "EPOCHS"), help=argparse.SUPPRESS)
    extra(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return None
    require_prepared_png()
    print(cpu_header(), flush=True)
    return args


def require_prepared_png() -> None:
    """Exit with one line when the prepared PNGs are not there yet."""
    if not (PREPARED_PNG / "manifest.json").is_file():
        raise SystemExit(f"{PREPARED_PNG}: not found; run benchmarks/time_to_accuracy.py first (it prepares the PNGs)")


def cpu_header(cpu: str = "this") -> str:
    """The CPU model and the ISA flags that decide oneDNN's kernels (and bf16's speed), for every table header,
    and the code path when it is another CPU's."""
    from imgclf.training.numerics import cpu_facts

    facts = cpu_facts()
    path = "".join(f", {k}={v}" for k, v in CPU_PATHS[cpu].items())
    return (f"CPU: {facts['cpu_model']}, {os.cpu_count()} cores, flags: {facts['cpu_isa']}"
            + (f"; code path: {cpu}{path}" if cpu != "this" else ""))


# --cpu: the code path of which CPU the children run. avx2 is an AVX2-only CPU's (most CPUs people train on
# without a GPU): oneDNN capped at AVX2, so its kernels, and every choice the pipeline makes from the CPU's flags
# (train.kernels, bfloat16), see no AVX-512 or bf16. This machine's caches stay its own (Zen 4: 1 MB of L2 a core,
# a Zen 3 has 512 KB), and TensorFlow's own default reads the real CPU, so the kernel path is set explicitly.
CPU_PATHS = {"this": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}


def child_env(cpu: str = "this") -> dict[str, str]:
    """A quiet TensorFlow, the package importable without installing it, and `cpu`'s code path."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO / "src"), **CPU_PATHS[cpu]}


def measure_child(script: str, args: list[str], cpu: str = "this") -> dict:
    """Run `python script --child ARGS` in a fresh process on `cpu`'s code path and return the JSON on its last
    stdout line."""
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True,
                          env=child_env(cpu))
    if proc.returncode != 0:
        raise SystemExit(f"{script} --child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_usage(cmd: list[str], env: dict[str, str], failure: str, cwd: Path | None = None) -> resource.struct_rusage:
    """Run `cmd` to its end and return its resource usage (CPU, peak RSS); exit with `failure` and the tail
    of its stderr when it fails."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads a pipe while wait4 waits
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{failure}: {err.read()[-2000:]!r}")
    return usage


def verdict(ratio: float, target: float, higher_is_better: bool = True) -> str:
    """'met (target >= 0.95)' or 'MISSED (...)': how every benchmark prints its ratios."""
    met = ratio >= target if higher_is_better else ratio <= target
    return f"{'met' if met else 'MISSED'} (target {'>=' if higher_is_better else '<='} {target:g})"


def own_peak_rss() -> int:
    """This process's peak resident memory in bytes, for a child to report (Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def epoch_timer(times: list[float]):
    """A Keras callback appending each epoch's wall time to `times` (Keras is imported only by those who time)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    return EpochTimer()
