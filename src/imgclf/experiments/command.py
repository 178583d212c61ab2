"""`imgclf experiments`: presets x seeds through DVC's experiment queue, then a table of dev macro-F1
beside the report's own numbers (reports/experiments.md and .png).

Each preset is a params override, never new code: the report's six variants of its own family, `fast`
(model.arch=fast with airbench94's training length and TTA) and `fast_muon` (airbench94_muon's recipe).
Where the report is ambiguous, the choice is written next to the preset. Runs that collapsed to one class are marked, and the mean is
given with and without them.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.experiments import dvc_queue as exp_queue
from imgclf.errors import ImgclfError
from imgclf.files.atomic import atomic_write
from imgclf.files.paths import EXPERIMENTS_MD, EXPERIMENTS_PNG, REPORTS_DIR
from imgclf.files.paths import repo_root
from imgclf.tracking.tracker import Tracker

FAST_EPOCHS = 10  # airbench94 trains 9.9 epochs of 50,000 images; these are whole epochs of the train split
FAST_MUON_EPOCHS = 8  # airbench94_muon trains 8


@dataclass(frozen=True)
class Preset:
    """Params overrides (DVC `-S` syntax) and the dev macro-F1 the report got (none for `fast`)."""

    report_f1: tuple[float, ...]
    overrides: dict[str, str] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # The final net of the report, i.e. params.yaml as it is.
    "report_final": Preset((0.760,)),
    # Without the two 256-filter convs. The block's max-pool stays: the report's code reshapes to a
    # hard-coded 2*2*512, which only fits if the net still pools four times.
    "no_256": Preset((0.715, 0.738), {"model.conv_blocks": "[[64, 64], [128, 128], [], [512, 512, 512]]"}),
    # Without the last 512-filter conv: the report's wording reads as the third 512 layer only.
    "no_512": Preset((0.748,), {"model.conv_blocks": "[[64, 64], [128, 128], [256, 256], [512, 512]]"}),
    # No hidden FC layers: flatten -> softmax layer.
    "single_fc": Preset((0.754,), {"model.dense_units": "[]"}),
    # 5x5 conv 64 -> 3x3 max-pool stride 2 -> 16x16 conv 128 -> 2x2 max-pool -> flatten (8*8*128) -> softmax,
    # 15 epochs. SAME padding everywhere, as the 8*8*128 flatten requires.
    "shallow": Preset((0.506,), {
        "model.conv_blocks": "[[64], [128]]", "model.kernel_size": "[5, 16]", "model.pool_size": "[3, 2]",
        "model.dense_units": "[]", "train.training_epochs": "15",
    }),
    # The same with dropout (rate 1 - keep_prob) after each pool. The report got 0.574 after 15 epochs and
    # 0.617 with a longer run that early-stopped at epoch 22; the preset is the 15-epoch one.
    "shallow_dropout": Preset((0.574, 0.617), {
        "model.conv_blocks": "[[64], [128]]", "model.kernel_size": "[5, 16]", "model.pool_size": "[3, 2]",
        "model.dense_units": "[]", "train.training_epochs": "15", "model.conv_dropout": "true",
    }),
    # Not the report's: the airbench94-style family (families/fast.py) with its batch, length and TTA. A fixed
    # per-step schedule decides the length, so no early stop.
    "fast": Preset((), {
        "model.arch": "fast", "train.batch_size": "1024", "train.training_epochs": str(FAST_EPOCHS),
        "train.early_stopping.monitor": "none", "evaluate.tta": "flip_translate",
    }),
    # airbench94_muon's recipe on the same net: Muon on the conv kernels, batch 2000, 8 epochs, no lookahead.
    "fast_muon": Preset((), {
        "model.arch": "fast", "model.fast.optimizer": "muon", "model.fast.lookahead_every": "0",
        "train.batch_size": "2000", "train.training_epochs": str(FAST_MUON_EPOCHS),
        "train.early_stopping.monitor": "none", "evaluate.tta": "flip_translate",
    }),
}
REPORT_VARIANTS = tuple(v for v in PRESETS if not v.startswith("fast"))  # what `imgclf experiments` runs by default


def queue_args(variant: str, seed: int, user_overrides: list[str]) -> list[str]:
    """`dvc exp run --queue` arguments for one (variant, seed); the user's -S come last and win."""
    sets = {"seed": str(seed), "tracking.variant": variant, **PRESETS[variant].overrides}
    args = [exp_queue.dvc_command(), "exp", "run", "--queue"]
    for item in [f"{k}={v}" for k, v in sets.items()] + list(user_overrides):
        args += ["-S", item]
    return args


def evaluated(run) -> bool:
    """Whether `evaluate` logged the run's final scores. Training logs `dev_f1_macro` per epoch under the same
    key, so its presence proves nothing: the `evaluated` tag does, or, in runs logged before that tag existed,
    the per-class scores that only evaluate logs."""
    from imgclf.evaluate import PER_CLASS
    from imgclf.tracking.context import EVALUATED

    return run.data.tags.get(EVALUATED) == "true" or any(k.startswith(f"dev_{PER_CLASS}/") for k in run.data.metrics)


def latest_runs(experiment: str, variants: list[str] | None, seeds: list[int] | None) -> dict[str, list]:
    """{variant: [latest finished and evaluated MLflow run per seed]}, from the tracking store."""
    import mlflow

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
                and "dev_f1_macro" in run.data.metrics and evaluated(run):
            chosen.setdefault(variant, {}).setdefault(seed, run)  # newest first: keep the first seen
    return {v: [chosen[v][s] for s in sorted(chosen[v])] for v in PRESETS if v in chosen}


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(variant: str, runs: list) -> dict:
    """One table row: seeds, F1 mean and std (all runs, and without collapsed ones), collapsed seeds, epochs,
    early stops, run ids, the report's number."""
    f1 = [r.data.metrics["dev_f1_macro"] for r in runs]
    collapsed = [r.data.tags.get("collapsed") == "true" for r in runs]
    return {
        "variant": variant,
        "seeds": [int(r.data.params["seed"]) for r in runs],
        "f1": mean_std(f1),
        "f1_learned": mean_std([f for f, c in zip(f1, collapsed) if not c]),
        "collapsed": [int(r.data.params["seed"]) for r, c in zip(runs, collapsed) if c],
        "epochs": [int(r.data.metrics.get("epochs_run", 0)) for r in runs],
        "early_stopped": sum(r.data.tags.get("early_stopped") == "True" for r in runs),
        "train_seconds": statistics.fmean(r.data.metrics.get("train_seconds", 0.0) for r in runs),
        "run_ids": [r.info.run_id for r in runs],
        "report": PRESETS[variant].report_f1,
    }


def _mean_std(pair: tuple[float, float] | None) -> str:
    return "—" if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def markdown(rows: list[dict]) -> str:
    """The table as Markdown (also printed)."""
    lines = ["| variant | seeds | dev macro-F1 (mean ± std) | without collapsed runs | collapsed (seeds) | epochs run "
             "| early-stopped | train s (mean) | MLflow runs | report |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        collapsed = f"{len(r['collapsed'])}/{len(r['seeds'])}" + (
            f" ({', '.join(map(str, r['collapsed']))})" if r["collapsed"] else "")
        lines.append(
            f"| {r['variant']} | {', '.join(map(str, r['seeds']))} | {_mean_std(r['f1'])} | {_mean_std(r['f1_learned'])} "
            f"| {collapsed} | {', '.join(map(str, r['epochs']))} | {r['early_stopped']}/{len(r['seeds'])} "
            f"| {r['train_seconds']:.0f} | {', '.join(i[:8] for i in r['run_ids'])} "
            f"| {' / '.join(f'{f:.3f}' for f in r['report']) or '—'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars of mean dev macro-F1 (± std over seeds) with the report's numbers as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    xs = range(len(rows))
    ax.bar(xs, [r["f1"][0] for r in rows], yerr=[r["f1"][1] for r in rows], capsize=4, label="this pipeline")
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r["report"]), r["report"], color="crimson", marker="D", zorder=3,
                   label="report" if x == 0 else None)
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=20)
    ax.set(ylabel="dev macro-F1", ylim=(0, 1), title="Presets: dev macro-F1 (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
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
