"""The experiments table: the latest finished, evaluated MLflow run per (preset, seed), dev macro-F1 mean and std
(with and without runs that collapsed to one class) beside the report's numbers, as reports/experiments.md and
reports/experiments.png."""

from __future__ import annotations

import statistics
from pathlib import Path

from imgclf.errors import ImgclfError
from imgclf.experiments.presets import PRESETS
from imgclf.files.atomic import atomic_write
from imgclf.files.paths import EXPERIMENTS_MD, EXPERIMENTS_PNG, REPORTS_DIR


def evaluated(run) -> bool:
    """Whether `evaluate` logged the run's final scores. Training logs the dev macro-F1 per epoch under the same
    key, so its presence proves nothing: the `evaluated` tag does, or, in runs logged before that tag existed,
    the per-class scores that only evaluate logs."""
    from imgclf.tracking.context import EVALUATED, PER_CLASS

    return run.data.tags.get(EVALUATED) == "true" or any(k.startswith(f"dev_{PER_CLASS}/") for k in run.data.metrics)


def latest_runs(experiment: str, variants: list[str] | None, seeds: list[int] | None) -> dict[str, list]:
    """{variant: [latest finished and evaluated MLflow run per seed]}, from the tracking store."""
    import mlflow

    from imgclf.tracking.keys import run_metric
    from imgclf.tracking.store import configure

    configure()
    exp = mlflow.get_experiment_by_name(experiment)
    runs = [] if exp is None else mlflow.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", output_format="list",
        order_by=["attributes.start_time DESC"])
    chosen: dict[str, dict[int, object]] = {}
    for run in runs:
        variant, seed = run.data.tags.get("variant"), int(run.data.params.get("seed", -1))
        if variant in PRESETS and (not variants or variant in variants) and (not seeds or seed in seeds) \
                and run_metric(run, "dev_f1_macro") is not None and evaluated(run):
            chosen.setdefault(variant, {}).setdefault(seed, run)  # newest first: keep the first seen
    return {v: [chosen[v][s] for s in sorted(chosen[v])] for v in PRESETS if v in chosen}


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(variant: str, runs: list) -> dict:
    """One table row: seeds, F1 mean and std (all runs, and without collapsed ones), collapsed seeds, epochs,
    early stops, run ids, the report's number."""
    from imgclf.tracking.keys import outcome, run_metric

    f1 = [run_metric(r, "dev_f1_macro") for r in runs]
    collapsed = [r.data.tags.get("collapsed") == "true" for r in runs]
    return {
        "variant": variant,
        "seeds": [int(r.data.params["seed"]) for r in runs],
        "f1": mean_std(f1),
        "f1_learned": mean_std([f for f, c in zip(f1, collapsed) if not c]),
        "collapsed": [int(r.data.params["seed"]) for r, c in zip(runs, collapsed) if c],
        "epochs": [int(r.data.metrics.get("epochs_run", 0)) for r in runs],
        "early_stopped": sum(outcome(r, "early_stopped") == 1 for r in runs),
        "train_seconds": statistics.fmean(r.data.metrics.get("train_seconds", 0.0) for r in runs),
        "run_ids": [r.info.run_id for r in runs],
        "report": PRESETS[variant].report_f1,
        # the data's own test split, when it has one (cifar10, folder/npz with test/): every run scored it
        **{key: mean_std(scores) if None not in (scores := [run_metric(r, key) for r in runs]) else None
           for key in ("test_f1_macro", "test_accuracy")},
    }


def _mean_std(pair: tuple[float, float] | None) -> str:
    return "—" if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def markdown(rows: list[dict]) -> str:
    """The table as Markdown (also printed)."""
    test = any(r["test_f1_macro"] for r in rows)
    lines = ["| variant | seeds | dev macro-F1 (mean ± std) | without collapsed runs | collapsed (seeds) | epochs run "
             "| early-stopped | train s (mean) | MLflow runs | report |"
             + (" test macro-F1 | test accuracy |" if test else ""), "|---|---|---|---|---|---|---|---|---|---|"
             + ("---|---|" if test else "")]
    for r in rows:
        collapsed = f"{len(r['collapsed'])}/{len(r['seeds'])}" + (
            f" ({', '.join(map(str, r['collapsed']))})" if r["collapsed"] else "")
        lines.append(
            f"| {r['variant']} | {', '.join(map(str, r['seeds']))} | {_mean_std(r['f1'])} | {_mean_std(r['f1_learned'])} "
            f"| {collapsed} | {', '.join(map(str, r['epochs']))} | {r['early_stopped']}/{len(r['seeds'])} "
            f"| {r['train_seconds']:.0f} | {', '.join(i[:8] for i in r['run_ids'])} "
            f"| {' / '.join(f'{f:.3f}' for f in r['report']) or '—'} |"
            + (f" {_mean_std(r['test_f1_macro'])} | {_mean_std(r['test_accuracy'])} |" if test else ""))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars of mean dev macro-F1 (± std over seeds) with the report's numbers as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4))  # one bar still fits the title
    xs = range(len(rows))
    ax.bar(xs, [r["f1"][0] for r in rows], yerr=[r["f1"][1] for r in rows], capsize=4, label="this pipeline")
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r["report"]), r["report"], color="crimson", marker="D", zorder=3,
                   label="report" if x == 0 else None)
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=20)
    ax.set(ylabel="dev macro-F1", ylim=(0, 1), title="Presets: dev macro-F1 (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight"))  # nothing clipped
    plt.close(fig)


def write_table(experiment: str, variants: list[str] | None, seeds: list[int] | None) -> list[dict]:
    """Build the table from MLflow, print it, write reports/experiments.md and reports/experiments.png."""
    rows = [summarize(v, runs) for v, runs in latest_runs(experiment, variants, seeds).items()]
    if not rows:
        raise ImgclfError(f"no finished variant runs in MLflow experiment {experiment!r}; run `imgclf experiments`")
    text = markdown(rows)
    reports = Path(REPORTS_DIR)
    atomic_write(reports / EXPERIMENTS_MD, lambda tmp: tmp.write_text(text))
    plot(rows, reports / EXPERIMENTS_PNG)
    print(text + f"\nwritten to {reports / EXPERIMENTS_MD} and {reports / EXPERIMENTS_PNG}")
    return rows
