"""The MLflow names of the scores, and reading scores back from runs of any age.

Training's per-epoch scores and evaluate's final ones are logged under sectioned keys, the split first
(`train/loss`, `dev/f1_macro`, `test/accuracy`), as Lightning and TensorBoard name them. MLflow's run page draws a
section per key prefix, in name order, above the unprefixed "Model metrics" (where the early-stop outcome, the
epoch's seconds and the run's totals stay), so the page opens on the dev curves and the training loss
(docs/mlflow.md#keys). reports/history.csv and reports/metrics.json keep the flat names (`loss`,
`dev_f1_macro`) that DVC's plots and metrics read; so does everything in the package that is not MLflow.
Runs logged before #43 have the flat names in MLflow too: every reader here takes either.
"""

from __future__ import annotations

TRAIN_SCORES = ("loss", "loss_sum", "accuracy")  # training's own per-epoch scores, on its (augmented) batches
SPLITS = ("dev", "test")  # the evaluated splits, whose scores are named `<split>_<score>` outside MLflow
# The early stop's outcome, logged as metrics (params until #43: see outcome()).
OUTCOME_METRICS = ("early_stopped", "stopped_epoch", "best_epoch", "best_loss")


def metric_key(name: str) -> str:
    """The MLflow key of a score named as in history.csv and metrics.json: `loss` -> `train/loss`,
    `dev_f1_macro` -> `dev/f1_macro`; any other name (`epoch_seconds`, `best_loss`) as it is."""
    if name in TRAIN_SCORES:
        return f"train/{name}"
    split, sep, score = name.partition("_")
    return f"{split}/{score}" if sep and split in SPLITS else name


def run_metric(run, name: str) -> float | None:
    """The latest value of score `name` in a run, under its key or (runs logged before #43) its flat name."""
    metrics = run.data.metrics
    return metrics.get(metric_key(name), metrics.get(name))


def metric_history(client, run_id: str, name: str) -> list:
    """Every logged point of score `name` in a run, under its key or (runs logged before #43) its flat name."""
    key = metric_key(name)
    return client.get_metric_history(run_id, key) or (client.get_metric_history(run_id, name) if key != name else [])


def outcome(run, key: str) -> float | None:
    """An early-stop outcome of a run as a number: its metric, else (runs logged before #43) its param or tag."""
    if key in run.data.metrics:
        return run.data.metrics[key]
    old = run.data.params.get(key, run.data.tags.get(key))
    try:
        return float({"True": 1, "False": 0}.get(old, old))
    except (TypeError, ValueError):  # absent, or not a number
        return None
