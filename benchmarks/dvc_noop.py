"""The cost of a no-op `dvc repro` (everything up to date) against `dvc status` on the same repo.

Sets up a temporary git copy of the repo (as the tests do), runs the pipeline once with the tests'
tiny settings, checks that `dvc repro` then has nothing to do, and times `dvc repro` and `dvc status`
alternately, each a fresh CLI process as a user would run it. Medians and their ratio.

Usage: python benchmarks/dvc_noop.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, verdict

sys.path.insert(0, str(REPO / "tests"))
from conftest import TINY, copy_repo, pipeline_env, run, set_args  # noqa: E402  (the tests' own repo copy)

TARGET = 1.5


def timed(cmd: list[str], repo: Path, env: dict) -> float:
    start = time.perf_counter()
    run(cmd, repo, env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = pipeline_env()
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-dvc-") as tmp:
        repo = copy_repo(Path(tmp))
        run(["dvc", "exp", "run", *set_args(TINY)], repo, env)  # the pipeline's outputs, then nothing to do
        if "Running stage" in run(["dvc", "repro"], repo, env).stdout:
            raise SystemExit("dvc repro is not a no-op after a complete run: fix that before timing it")
        times: dict[str, list[float]] = {"repro": [], "status": []}
        for i in range(args.repeats):
            for name in times:
                times[name].append(timed(["dvc", name], repo, env))
            print(f"run {i + 1}: dvc repro {times['repro'][-1]:.2f} s, dvc status {times['status'][-1]:.2f} s",
                  flush=True)
    repro, status = (statistics.median(times[name]) for name in ("repro", "status"))
    print(f"\nno-op dvc repro vs dvc status, {args.repeats} runs each (medians)")
    print(f"dvc repro {repro:.2f} s   dvc status {status:.2f} s   repro / status = {repro / status:.2f}x   "
          f"{verdict(repro / status, TARGET, higher_is_better=False)}")


if __name__ == "__main__":
    main()
