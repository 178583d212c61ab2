"""The `evaluate` stage: macro F1 and friends on dev (and test), plots, and the MLflow run's close."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from imgclf.evaluation import figures
from imgclf.files import modelfile
from imgclf.files.atomic import atomic_write, read_json, write_json
from imgclf.files.paths import (CLASSIFICATION_REPORT, CONFUSION_PNG, DEV_PREDICTIONS, METRICS_JSON, MISTAKES_PNG,
                                MODEL_PATH, PR_CURVES_PNG, PR_DIR, PREPARED_DIR, REPORTS_DIR, RUN_INFO, TRAIN_SUMMARY)
from imgclf.files.prepared_reader import load_prepared
from imgclf.metrics import classification_metrics
from imgclf.tta import predict_logits, softmax
from imgclf.training.numerics import pin_kernels

SUMMARY_KEYS = ("f1_macro", "accuracy", "loss", "count")
TRAIN_KEYS = ("epochs_run", "early_stopped", "stopped_epoch", "best_epoch", "best_loss", "collapsed",
              "stop_reason")


def draw(splits: dict, logits: dict, results: dict, classes: list[str], reports_dir: Path) -> None:
    """The confusion matrices, the most confident mistakes, and dev's precision-recall curves (PNG and dvc plots data)."""
    probs = {split: softmax(np.asarray(out, np.float64)) for split, out in logits.items()}
    figures.plot_confusion(results, classes, reports_dir / CONFUSION_PNG)
    figures.plot_mistakes({s: (splits[s][0], splits[s][1], p) for s, p in probs.items()}, classes,
                          reports_dir / MISTAKES_PNG)
    curves = figures.pr_curves(splits["dev"][1], probs["dev"], classes)
    figures.write_pr_data(curves, reports_dir / PR_DIR)
    figures.plot_pr_curves(curves, "dev", reports_dir / PR_CURVES_PNG)


def csv_text(header: list[str], rows, classes: list[str]) -> str:
    """The rows under `header` as "\n"-terminated CSV, for rows that hold class names.

    The minimal quoting quotes a field holding a comma, a quote or a character of the line terminator ("\n"
    only), so a "\r" in a name would go unquoted and a reader would end the row there: then every field is
    quoted. Only then: ordinary names keep the files' bytes (the default run's dev_predictions.csv is committed,
    tracked by dvc.lock)."""
    quoting = csv.QUOTE_ALL if any("\r" in name for name in classes) else csv.QUOTE_MINIMAL
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=quoting)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_predictions(y_true: np.ndarray, logits: np.ndarray, classes: list[str], path: Path) -> None:
    """actual,predicted class names per dev image: the data of DVC's confusion-matrix plot."""
    pairs = ((classes[a], classes[p]) for a, p in zip(y_true, logits.argmax(axis=1)))
    text = csv_text(["actual", "predicted"], pairs, classes)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


# MLflow's run page lists a chart section per key prefix, by name, above "Model metrics": per-class scores as
# metrics (`dev_f1_per_class/...`) would put ten charts between the dev curves and the training loss
# (tracking/keys.py). MLflow's own classifier evaluator keeps them in this table artifact instead; so does evaluate.
PER_CLASS_CSV = "per_class_metrics.csv"


def final_metrics(results: dict) -> dict[str, float]:
    """`<split>_f1_macro` and `<split>_accuracy` for every evaluated split."""
    return {f"{split}_{key}": res[key] for split, res in results.items() for key in ("f1_macro", "accuracy")}


def per_class_table(results: dict, classes: list[str]) -> str:
    """split,class,precision,recall,f1,support per evaluated split and class: the per-class scores as CSV."""
    scores = ("precision", "recall", "f1", "support")
    return csv_text(["split", "class", *scores], ([split, c, *(res["per_class"][c][k] for k in scores)]
                                                  for split, res in results.items() for c in classes), classes)


def log_to_mlflow(tracker, run_id: str | None, results: dict, classes: list[str], train: dict, tta: str,
                  reports_dir: Path, name: str) -> None:
    """Final metrics at the last epoch's step and the reports, into the run that trained the model (or a new
    run named `name`); then the `evaluated` tag, which is what tells these final scores from training's."""
    with tracker.evaluation_run(run_id, train["weights_sha256"], tta, name) as run:
        reports = (CONFUSION_PNG, MISTAKES_PNG, PR_CURVES_PNG, METRICS_JSON, CLASSIFICATION_REPORT)
        run.log_final(final_metrics(results), train["epochs_run"], [reports_dir / r for r in reports],
                      {PER_CLASS_CSV: per_class_table(results, classes)})


def training_run_id(reports_dir: Path, train: dict) -> str | None:
    """The MLflow run that trained this very model, from the untracked reports/run.json, if it is there."""
    path = reports_dir / RUN_INFO
    info = read_json(path, "run info") if path.is_file() else {}
    return info.get("mlflow_run_id") if info.get("weights_sha256") == train["weights_sha256"] else None


def evaluate(params: dict, prepared_dir: str | Path = PREPARED_DIR, model_path: str | Path = MODEL_PATH,
             reports_dir: str | Path = REPORTS_DIR) -> dict:
    """Score the trained model on dev (and test) under evaluate.tta, write metrics and plots, close the MLflow run."""
    from imgclf.tracking.context import run_name
    from imgclf.tracking.tracker import Tracker

    reports_dir, tta = Path(reports_dir), params["evaluate"]["tta"]
    trained = read_json(reports_dir / TRAIN_SUMMARY, "training summary")
    tracker = Tracker.connect(params["tracking"])
    splits, manifest = load_prepared(prepared_dir)
    classes = manifest["classes"]
    pin_kernels(params["train"]["numerics"])  # portable: the same cache sizes as training, for the same logits
    model = modelfile.load(model_path, trained["weights_sha256"], str(reports_dir / TRAIN_SUMMARY))
    logits = {split: predict_logits(model, splits[split][0], tta) for split in ("dev", "test") if split in splits}
    results = {split: classification_metrics(splits[split][1], out, classes) for split, out in logits.items()}
    metrics = {split: {k: res[k] for k in SUMMARY_KEYS} for split, res in results.items()}
    metrics["train"] = {k: trained[k] for k in TRAIN_KEYS}
    write_json(reports_dir / CLASSIFICATION_REPORT, results)
    write_predictions(splits["dev"][1], logits["dev"], classes, reports_dir / DEV_PREDICTIONS)
    draw(splits, logits, results, classes, reports_dir)
    write_json(reports_dir / METRICS_JSON, metrics)
    log_to_mlflow(tracker, training_run_id(reports_dir, trained), results, classes, trained, tta, reports_dir,
                  run_name(params, manifest["dataset"], "eval"))
    return metrics


def main(params: dict) -> dict:
    """Entry point of `imgclf evaluate` (the DVC evaluate stage)."""
    tta = params["evaluate"]["tta"]
    metrics = evaluate(params)
    line = ", ".join(f"{s} macro-F1 {metrics[s]['f1_macro']:.4f} acc {metrics[s]['accuracy']:.4f}"
                     for s in ("dev", "test") if s in metrics)
    print(f"Evaluated (tta: {tta}): {line}; metrics -> {REPORTS_DIR}/{METRICS_JSON}")
    return metrics
