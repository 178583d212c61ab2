"""The CPU an `imgclf` command spends in Python's garbage collector: with imgclf.process against without.

Importing Keras (with TensorFlow) and MLflow makes ~600,000 long-lived objects, and Python's collector walks
them at each full collection while they pile up and again at exit. The commands import them with the
collector off and freeze them (imports_first), and the console script freezes everything before exit
(leave). Both variants run the same commands of a tiny project (digits, the tests' TINY net, 2 epochs) in
fresh processes, alternately: the baseline with gc.disable and gc.freeze made no-ops (Python's default
collection throughout, as before), and the console script as installed. Medians of user+system CPU seconds
per command, and their ratio.

Usage: python benchmarks/collector.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import REPO, child_env, child_usage, cpu_header, verdict

TARGET = 0.9  # worth the freezing only if a small command gets at least 10 % cheaper
TINY = ["train.training_epochs=2", "data.max_train_samples=200", "model.conv_blocks=[[8], [16]]",
        "model.dense_units=[32]"]
COMMANDS = ("prepare", "train", "evaluate")
ENTRIES = {  # variant -> the code its process runs
    "default collection": "import gc, sys; gc.disable = gc.freeze = lambda: None; "
                          "from imgclf.cli import console; sys.exit(console())",
    "console script": "import sys; from imgclf.cli import console; sys.exit(console())",
}


def command_cpu(entry: str, command: str, project: Path) -> tuple[float, float]:
    """User+system CPU seconds and peak RSS (MiB) of one fresh process running `imgclf -S ... COMMAND`
    through `entry`."""
    args = [sys.executable, "-c", entry, *(a for kv in TINY for a in ("-S", kv)), command]
    usage = child_usage(args, child_env(), f"imgclf {command} failed in {project}", cwd=project)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(cpu_header())
    project = Path(tempfile.mkdtemp(prefix="imgclf-collector-"))
    try:
        shutil.copy(REPO / "params.yaml", project)
        times = {(entry, command): [] for entry in ENTRIES for command in COMMANDS}
        for i in range(args.repeats):
            for command in COMMANDS:  # in stage order: each command reads what the one before wrote
                for entry in ENTRIES:
                    times[entry, command].append(command_cpu(ENTRIES[entry], command, project))
            print(f"run {i + 1}: " + ", ".join(f"{c} " + " / ".join(f"{times[e, c][-1][0]:.2f}" for e in ENTRIES) + " s"
                                             for c in COMMANDS), flush=True)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    print(f"\nCPU seconds and peak RSS per command, {args.repeats} fresh processes each (medians)")
    baseline = next(iter(ENTRIES))
    for command in COMMANDS:
        (base, base_rss), (new, new_rss) = (median_pair(times[entry, command]) for entry in ENTRIES)
        print(f"imgclf {command:8}  {baseline}: {base:5.2f} s {base_rss:4.0f} MiB   console script: {new:5.2f} s "
              f"{new_rss:4.0f} MiB   ratio {new / base:.2f}   {verdict(new / base, TARGET, higher_is_better=False)}")


def median_pair(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """The medians of (CPU seconds, MiB) samples, each taken on its own."""
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


if __name__ == "__main__":
    main()
