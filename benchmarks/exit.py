"""The CPU an `imgclf` command spends ending: Python's own exit against the console script's (errors.leave).

After TensorFlow, Keras and MLflow are imported, a process holds ~600,000 objects, and Python's exit runs
full garbage collections over all of them. The console script freezes them out of the collector first.
Both variants run the same commands of a tiny project (digits, the tests' TINY net, 2 epochs) in fresh
processes, alternately: `main()` then a plain exit (the baseline, as before), and `console()` (what the
`imgclf` script runs). Medians of user+system CPU seconds per command, and their ratio.

Usage: python benchmarks/exit.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, child_env, cpu_header, verdict

TARGET = 0.9  # worth a second entry point only if a small command gets at least 10 % cheaper
TINY = ["train.training_epochs=2", "data.max_train_samples=200", "model.conv_blocks=[[8], [16]]",
        "model.dense_units=[32]"]
COMMANDS = ("prepare", "train", "evaluate")
ENTRIES = {  # variant -> the code its process runs
    "main(), plain exit": "import sys; from imgclf.cli import main; sys.exit(main())",
    "console script": "import sys; from imgclf.cli import console; sys.exit(console())",
}


def command_cpu(entry: str, command: str, project: Path) -> float:
    """User+system CPU seconds of one fresh process running `imgclf -S ... COMMAND` through `entry`."""
    args = [sys.executable, "-c", entry, *(a for kv in TINY for a in ("-S", kv)), command]
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads a pipe while wait4 waits
        proc = subprocess.Popen(args, cwd=project, env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"imgclf {command} failed in {project}: {err.read()[-2000:]!r}")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(cpu_header())
    project = Path(tempfile.mkdtemp(prefix="imgclf-exit-"))
    try:
        shutil.copy(REPO / "params.yaml", project)
        times = {(entry, command): [] for entry in ENTRIES for command in COMMANDS}
        for i in range(args.repeats):
            for command in COMMANDS:  # in stage order: each command reads what the one before wrote
                for entry in ENTRIES:
                    times[entry, command].append(command_cpu(ENTRIES[entry], command, project))
            print(f"run {i + 1}: " + ", ".join(f"{c} " + " / ".join(f"{times[e, c][-1]:.2f}" for e in ENTRIES) + " s"
                                             for c in COMMANDS), flush=True)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    print(f"\nCPU seconds per command, {args.repeats} fresh processes each (medians)")
    baseline = next(iter(ENTRIES))
    for command in COMMANDS:
        base = statistics.median(times[baseline, command])
        new = statistics.median(times["console script", command])
        print(f"imgclf {command:8}  {baseline}: {base:5.2f} s   console script: {new:5.2f} s   "
              f"ratio {new / base:.2f}   {verdict(new / base, TARGET, higher_is_better=False)}")


if __name__ == "__main__":
    main()
