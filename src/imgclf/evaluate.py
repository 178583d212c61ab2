"""The `evaluate` stage: macro F1 and friends on dev (and test), plots, and the MLflow run's close."""

from __future__ import annotations

import csv
import io as _io
import re
from pathlib import Path

import numpy as np

from imgclf.data import PREPARED_DIR, load_prepared
from imgclf.io import atomic_write, read_json, write_json
from imgclf.metrics import classification_metrics
from imgclf.train import MODEL_PATH, REPORTS_DIR

SUMMARY_KEYS = ("f1_macro", "accuracy", "loss", "count")
TRAIN_KEYS = ("epochs_run", "early_stopped", "stopped_epoch", "best_epoch", "best_loss")


def predict_logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for uint8 images; the model scales raw pixels itself."""
    return model.predict(x.astype(np.float32), batch_size=batch_size, verbose=0)


def plot_confusion(results: dict, classes: list[str], path: Path) -> None:
    """One confusion-matrix panel per evaluated split, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.45 * len(classes) + 2)
    fig, axes = plt.subplots(1, len(results), figsize=(size * len(results), size), squeeze=False)
    for ax, (split, res) in zip(axes[0], results.items()):
        matrix = np.array(res["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set(xlabel="predicted", ylabel="actual", title=f"{split}: macro F1 {res['f1_macro']:.3f}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def write_predictions(y_true: np.ndarray, logits: np.ndarray, classes: list[str], path: Path) -> None:
    """actual,predicted class names per dev image: the data of DVC's confusion-matrix plot."""
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(y_true, logits.argmax(axis=1)))
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def mlflow_metric_name(text: str) -> str:
    """Class names may hold characters MLflow refuses in metric keys."""
    return re.sub(r"[^0-9A-Za-z_.\-/ ]", "_", text)


def log_to_mlflow(run_id: str, results: dict, classes: list[str], step: int, reports_dir: Path) -> None:
    """Final F1/accuracy per split and per-class dev F1, at the last epoch's step, plus the plots."""
    import mlflow

    from imgclf.tracking import Tracker

    with Tracker.reopen(run_id):
        final = {f"{split}_{key}": res[key] for split, res in results.items() for key in ("f1_macro", "accuracy")}
        final.update({f"dev_f1_{mlflow_metric_name(c)}": results["dev"]["per_class"][c]["f1"] for c in classes})
        mlflow.log_metrics(final, step=step)
        for name in ("confusion_matrix.png", "metrics.json", "classification_report.json"):
            mlflow.log_artifact(str(reports_dir / name))


def evaluate(prepared_dir: str | Path = PREPARED_DIR, model_path: str | Path = MODEL_PATH,
             reports_dir: str | Path = REPORTS_DIR) -> dict:
    """Score the trained model on dev (and test), write metrics and plots, close the MLflow run."""
    from imgclf.model import load_model
    from imgclf.tracking import configure

    reports_dir = Path(reports_dir)
    trained = read_json(reports_dir / "train.json", "training summary")
    configure()
    splits, manifest = load_prepared(prepared_dir)
    classes = manifest["classes"]
    model = load_model(str(model_path))
    results, dev_logits = {}, None
    for split in ("dev", "test"):
        if split in splits:
            x, y = splits[split]
            logits = predict_logits(model, x)
            dev_logits = logits if split == "dev" else dev_logits
            results[split] = classification_metrics(y, logits, classes)
    metrics = {split: {k: res[k] for k in SUMMARY_KEYS} for split, res in results.items()}
    metrics["train"] = {k: trained[k] for k in TRAIN_KEYS}
    metrics["mlflow_run_id"] = trained["mlflow_run_id"]
    write_json(reports_dir / "classification_report.json", results)
    write_predictions(splits["dev"][1], dev_logits, classes, reports_dir / "dev_predictions.csv")
    plot_confusion(results, classes, reports_dir / "confusion_matrix.png")
    write_json(reports_dir / "metrics.json", metrics)
    log_to_mlflow(trained["mlflow_run_id"], results, classes, trained["epochs_run"], reports_dir)
    return metrics


def main(params: dict) -> dict:
    """Entry point of `imgclf evaluate` (the DVC evaluate stage)."""
    del params  # validated by the caller; evaluation reads no params section
    metrics = evaluate()
    line = ", ".join(f"{s} macro-F1 {metrics[s]['f1_macro']:.4f} acc {metrics[s]['accuracy']:.4f}"
                     for s in ("dev", "test") if s in metrics)
    print(f"Evaluated: {line}; metrics -> {REPORTS_DIR}/metrics.json")
    return metrics
