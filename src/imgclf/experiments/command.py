"""`imgclf experiments`: presets x seeds through DVC's experiment queue, then a table of dev macro-F1
beside the report's own numbers (reports/experiments.md and .png).

Each preset is a params override, never new code: the report's six variants of its own family, `fast`
(model.arch=fast with airbench94's training length and TTA) and `fast_muon` (airbench94_muon's recipe).
Where the report is ambiguous, the choice is written next to the preset. Runs that collapsed to one class are marked, and the mean is
given with and without them. This module is the command; presets.py holds the presets, dvc_queue.py runs them,
table.py writes the table.
"""

from __future__ import annotations

import sys

from imgclf.experiments import dvc_queue as exp_queue
from imgclf.errors import ImgclfError
from imgclf.experiments.presets import PRESETS, REPORT_VARIANTS
from imgclf.experiments.table import write_table
from imgclf.files.paths import repo_root
from imgclf.tracking.tracker import Tracker


def queue_args(variant: str, seed: int, user_overrides: list[str]) -> list[str]:
    """`dvc exp run --queue` arguments for one (variant, seed); the user's -S come last and win."""
    sets = {"seed": str(seed), "tracking.variant": variant, **PRESETS[variant].overrides}
    args = [exp_queue.dvc_command(), "exp", "run", "--queue"]
    for item in [f"{k}={v}" for k, v in sets.items()] + list(user_overrides):
        args += ["-S", item]
    return args


def main(params: dict, variants: list[str], seeds: list[int] | None, user_overrides: list[str], jobs: int,
         table_only: bool) -> int:
    """Run the grid (unless table_only) and write the table; exit 1 if some experiment failed."""
    unknown = sorted(set(variants) - set(PRESETS))
    if unknown:
        raise ImgclfError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    chosen = variants or list(REPORT_VARIANTS)
    experiment = params["tracking"]["experiment"]
    if table_only:
        write_table(experiment, variants or None, seeds)
        return 0
    seeds = seeds or [params["seed"]]
    exp_queue.refuse_untracked_inputs(repo_root())
    # Fail fast on an unreachable store before queueing anything, and create the experiment once.
    Tracker.connect(params["tracking"])
    grid = [exp_queue.Job(f"{v} seed {s}", queue_args(v, s, user_overrides)) for v in chosen for s in seeds]
    failed = exp_queue.run(repo_root(), grid, jobs)
    rows = write_table(experiment, chosen, seeds)
    missing = [v for v in chosen if v not in {r["variant"] for r in rows}]
    if failed or missing:
        print("imgclf experiments: " + "; ".join(f"{j.label}: {j.status.lower()} ({j.name})" for j in failed)
              + f"; no MLflow runs for: {', '.join(missing) or 'none'}; see `dvc queue logs NAME`", file=sys.stderr)
        return 1
    return 0
