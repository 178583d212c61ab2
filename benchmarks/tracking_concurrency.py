"""Concurrent MLflow writers: 1, 2 and 4 processes each logging what a training run logs, at once, into
(a) a clone's own sqlite file (`sqlite:///mlflow.db`, the default store), (b) an `mlflow server` on that sqlite
file (the old way to share), (c) the team server: `imgclf-team serve`, an `mlflow server` on PostgreSQL.

A writer's run is the pipeline's: start the run with its owner tags, ~70 params, ~25 tags, params.yaml as an
artifact, the prepared data as a dataset input (under the pipeline's sqlite lock, as tracking/runs.py does), then
`--epochs` per-epoch metric batches (the 8 EPOCH_METRICS, through tracking.runs.log_epoch) and the final scores.
Writers start together (a barrier, after imports). Per cell: runs per minute (finished runs / wall time), the
median and 95th percentile of a tracking call, waits (calls of 0.5 s or more: a lock or a busy server made the
writer wait) and failures (a call that raised). Each cell is repeated; the table gives medians.
Not part of `make test`. Usage:
  python benchmarks/tracking_concurrency.py [--writers 1 2 4] [--runs 1] [--epochs 50] [--repeats 3]
                                            [--targets sqlite sqlite-server postgres-server]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from common import REPO, cpu_header

sys.path.insert(0, str(REPO / "tests"))
from conftest import MlflowServer  # noqa: E402  (the tests' real servers)
from test_team import TeamServer  # noqa: E402

WAIT_SECONDS = 0.5
TARGETS = ("sqlite", "sqlite-server", "postgres-server")


def run_content() -> tuple[dict, dict, str, dict]:
    """Params, tags, params.yaml text and a manifest shaped like a real run's (the repo's params.yaml)."""
    import yaml

    from imgclf.tracking.context import flatten

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    flat = {k: str(v) for k, v in flatten(params).items()}
    tags = {f"bench_tag_{i}": "x" * 40 for i in range(25)}
    manifest = {"dataset": "digits", "digest": "b" * 64, "source": {"path": None}}
    return flat, tags, yaml.safe_dump(params), manifest


def timed(calls: list[float], fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        calls.append(time.perf_counter() - start)


def one_run(uri: str, experiment: str, epochs: int, calls: list[float]) -> None:
    """What the pipeline logs for one training run (tracking.Tracker / TrainingRun / log_epoch)."""
    import mlflow

    from imgclf.tracking.orphans import owner_tags
    from imgclf.tracking.keys import metric_key
    from imgclf.tracking.runs import _prepared_dataset, log_epoch
    from imgclf.tracking.store import after_lost_race, store_lock
    from imgclf.tracking.tracker import Tracker

    params, tags, params_yaml, manifest = run_content()
    # The pipeline's own get-or-create of the experiment (configure, the sqlite lock, a lost race recovered).
    tracker = timed(calls, Tracker.connect, {"experiment": experiment, "register_model": None})
    timed(calls, mlflow.start_run, experiment_id=tracker.experiment_id, tags=owner_tags())
    try:
        timed(calls, mlflow.log_params, params)
        timed(calls, mlflow.set_tags, tags)
        timed(calls, mlflow.log_text, params_yaml, "params.yaml")

        def log_input():
            mlflow.log_input(_prepared_dataset(manifest), context="training")

        with store_lock(uri):  # as TrainingRun.log_start
            timed(calls, after_lost_race, log_input, log_input)
        for epoch in range(1, epochs + 1):
            logs = {"loss": 1.0 / epoch, "loss_sum": 10.0 / epoch, "accuracy": 0.5, "dev_loss": 1.1 / epoch,
                    "dev_accuracy": 0.5, "dev_f1_macro": 0.5, "early_stopping_wait": 0, "epoch_seconds": 1.0}
            timed(calls, log_epoch, logs, epoch)
        timed(calls, mlflow.log_metrics, {metric_key("dev_f1_macro"): 0.9, "epochs_run": epochs}, step=epochs)
    finally:
        timed(calls, mlflow.end_run)


def writer(uri: str, experiment: str, runs: int, epochs: int, barrier, results) -> None:
    """One process: wait for the others, then log `runs` runs; report call times and failures."""
    from imgclf.errors import one_line

    os.environ["MLFLOW_TRACKING_URI"] = uri  # Tracker.connect reads it, as the pipeline does
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # MLflow's "View run at" lines, not the table's
    calls: list[float] = []
    failures: list[str] = []
    barrier.wait()
    for _ in range(runs):
        try:
            one_run(uri, experiment, epochs, calls)
        except Exception as exc:  # a failure is a figure here, not the end of the benchmark
            failures.append(one_line(exc)[:200])
    results.put({"calls": calls, "failures": failures, "ok": runs - len(failures)})


def cell(uri: str, experiment: str, writers: int, runs: int, epochs: int) -> dict:
    """`writers` processes at once (forked after the imports: starting Python is not what is measured)."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(writers + 1), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(uri, experiment, runs, epochs, barrier, results)) for _ in range(writers)]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    reports = [results.get(timeout=900) for _ in procs]
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join()
    calls = sorted(c for r in reports for c in r["calls"])
    return {"runs_per_min": 60 * sum(r["ok"] for r in reports) / wall,
            "p50_ms": 1000 * statistics.median(calls),
            "p95_ms": 1000 * calls[int(0.95 * (len(calls) - 1))],
            "waits": sum(c >= WAIT_SECONDS for c in calls),
            "failures": [f for r in reports for f in r["failures"]]}


def row(target: str, writers: int, cells: list[dict]) -> str:
    """One table row: medians over the repeats (and each repeat's runs per minute), failures with the first."""
    rates = [c["runs_per_min"] for c in cells]
    failures = [f for c in cells for f in c["failures"]]
    return (f"| {target} | {writers} | {statistics.median(rates):.1f} ({', '.join(f'{r:.1f}' for r in rates)}) "
            f"| {statistics.median(c['p50_ms'] for c in cells):.0f} "
            f"| {statistics.median(c['p95_ms'] for c in cells):.0f} "
            f"| {statistics.median(c['waits'] for c in cells):.0f} "
            f"| {len(failures)}{': ' + failures[0] if failures else ''} |")


@contextlib.contextmanager
def store(target: str, root: Path) -> Iterator[str]:
    """The tracking URI of one target, its server running for the duration."""
    if target == "sqlite":
        yield f"sqlite:///{root / 'direct' / 'mlflow.db'}"
    elif target == "sqlite-server":
        server = MlflowServer(root / "sqlite-server")
        try:
            yield server.uri
        finally:
            server.kill()
    else:
        team = TeamServer()
        try:
            yield team.start()
        finally:
            team.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=1, help="runs per writer per repeat")
    parser.add_argument("--epochs", type=int, default=50, help="per-epoch metric batches per run (the report: 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    args = parser.parse_args()
    import imgclf.tracking.tracker  # noqa: F401  (MLflow and Keras once, here: the forked writers inherit them)

    print(cpu_header())
    print(f"{args.runs} run(s) of {args.epochs} epochs per writer, {args.repeats} repeats; medians; "
          f"waits = calls >= {WAIT_SECONDS} s\n")
    print("| store | writers | runs / min (median; each) | call p50 ms | call p95 ms | waits | failures |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-tracking-") as tmp:
        os.chdir(tmp)  # sqlite's mlruns/ lands here, not in the repo
        (Path(tmp) / "direct").mkdir()
        for target in args.targets:
            with store(target, Path(tmp)) as uri:
                for writers in args.writers:
                    print(row(target, writers, [cell(uri, f"bench-{writers}-{rep}", writers, args.runs, args.epochs)
                                                for rep in range(args.repeats)]), flush=True)
        os.chdir(REPO)


if __name__ == "__main__":
    main()
