"""What the fingerprint stage costs every `dvc repro`, beside the `prepare` it saves when nothing changed.

Both are the real commands (`imgclf fingerprint`, `imgclf prepare`) in fresh processes, on a folder source of
your images, from a scratch project folder; the page cache is warm (the first fingerprint run reads the files
once and is not counted), as it is for a repro soon after the last one.

Usage: python benchmarks/fingerprint.py --path FOLDER [--repeats 5]
  FOLDER: a train/<class>/<image> tree, e.g. the 50,000 CIFAR-10 training PNGs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, child_env, cpu_header, verdict

IMGCLF = [sys.executable, "-m", "imgclf.cli", "--params", str(REPO / "params.yaml")]
TARGET_S = 5.0  # #32: an unchanged source costs seconds (the whole command, as every `dvc repro` runs it)


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*IMGCLF, *args], cwd=cwd, env=child_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"imgclf {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="a folder source: train/<class>/<image>")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    source = ["-S", "data.dataset=folder", "-S", f"data.path={Path(args.path).resolve()}"]
    print(cpu_header())
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-fingerprint-") as tmp:
        project = Path(tmp)
        (project / "data").mkdir()
        timed([*source, "fingerprint"], project)  # reads the files into the page cache
        times = [timed([*source, "fingerprint"], project) for _ in range(args.repeats)]
        facts = json.loads((project / "data/fingerprint.json").read_text())
        prepare = timed([*source, "prepare"], project)
    fingerprint = statistics.median(times)
    print(f"source: {facts['files']:,} files, {facts['bytes'] / 1e6:.1f} MB")
    print(f"imgclf fingerprint (median of {args.repeats}, whole command): {fingerprint:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"imgclf prepare (1 run, what it saves when nothing changed): {prepare:.1f} s; "
          f"fingerprint / prepare: {fingerprint / prepare:.2f}")
    print(f"fingerprint: {fingerprint:.2f} s, {verdict(fingerprint, TARGET_S, higher_is_better=False)}")


if __name__ == "__main__":
    main()
