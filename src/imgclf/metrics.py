"""Classification metrics shared by training (per-epoch dev F1) and evaluation."""

from __future__ import annotations

import numpy as np

# What training logs per epoch (MLflow, step = epoch), in the order MLflow shows them.
EPOCH_METRICS = ("loss", "loss_sum", "accuracy", "dev_loss", "dev_accuracy", "dev_f1_macro",
                 "early_stopping_wait", "epoch_seconds")
# reports/history.csv: the same less wall time, so a rerun on the same machine writes the same bytes.
HISTORY_COLUMNS = ("epoch", *(m for m in EPOCH_METRICS if m != "epoch_seconds"))


def f1_macro(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """The report's "f1 score": scikit-learn's macro F1 over every class, absent ones scoring 0."""
    from sklearn.metrics import f1_score  # here: scikit-learn takes ~1 s to import, which only scoring needs

    return float(f1_score(y_true, y_pred, labels=range(num_classes), average="macro", zero_division=0))


def softmax_cross_entropy(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Mean softmax cross-entropy on logits, computed in float64 (stable log-sum-exp)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y_true)), y_true].mean())


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, classes: list[str]) -> dict:
    """Loss, accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_pred = logits.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    }
    return {
        "count": int(len(y_true)),
        "loss": softmax_cross_entropy(y_true, logits),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": f1_macro(y_true, y_pred, len(classes)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
