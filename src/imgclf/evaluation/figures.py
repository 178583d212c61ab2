"""What `evaluate` draws, for people who would rather look than read: the confusion matrices, the images the model
gets most confidently wrong, and each class's precision-recall curve (also as data for `dvc plots`, a plot per class).

Every figure is sized from what it holds (classes, images, splits), so its labels fit.
"""

from __future__ import annotations

import csv
import io
import string
import urllib.parse
from pathlib import Path

import numpy as np

from imgclf.files.atomic import atomic_write

MISTAKES_PER_SPLIT = 8
CURVE_POINTS = 101  # per class in the dvc plots data: enough to draw, small enough for git
FILE_SAFE = frozenset(string.ascii_letters + string.digits + "_-")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight"))  # tight: nothing clipped
    _pyplot().close(fig)


def plot_confusion(results: dict, classes: list[str], path: Path) -> None:
    """One confusion-matrix panel per evaluated split, counts written in the cells."""
    plt = _pyplot()
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
    _save(fig, path)


def confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int = MISTAKES_PER_SPLIT) -> np.ndarray:
    """Indices of the misclassified images, most confident (highest predicted probability) first, at most n."""
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:n]


def plot_mistakes(splits: dict, classes: list[str], path: Path) -> None:
    """A row per split ({name: (images, labels, probabilities)}) of its most confident mistakes, each titled with
    the true and the predicted class and that probability."""
    plt = _pyplot()
    fig = plt.figure(figsize=(1.9 * MISTAKES_PER_SPLIT, 2.6 * len(splits)))
    for sub, (split, (x, y, probs)) in zip(np.atleast_1d(fig.subfigures(len(splits), 1)), splits.items()):
        shown = confident_mistakes(y, probs)
        wrong = int((probs.argmax(axis=1) != y).sum())
        sub.suptitle(f"{split}: the {len(shown)} most confident of {wrong} mistakes in {len(y)} images", fontsize=10)
        axes = sub.subplots(1, MISTAKES_PER_SPLIT)
        for ax in axes:
            ax.axis("off")
        for ax, i in zip(axes, shown):
            ax.imshow(np.asarray(x[i]), interpolation="nearest")
            guess = int(probs[i].argmax())
            ax.set_title(f"true {classes[y[i]]}\npredicted {classes[guess]}\n{probs[i, guess]:.2f}", fontsize=8)
    _save(fig, path)


def pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, tuple]:
    """{class: (recall, precision, average precision)}, one class against the rest, thinned to CURVE_POINTS."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    curves = {}
    for c, name in enumerate(classes):
        positive = y_true == c
        if not positive.any():
            continue  # no image of the class in this split: no curve
        precision, recall, _ = precision_recall_curve(positive, probs[:, c])
        keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), CURVE_POINTS)).astype(int))
        curves[name] = (recall[keep], precision[keep], float(average_precision_score(positive, probs[:, c])))
    return curves


def file_name(text: str) -> str:
    """A class name as a file name, unique and reversible (`class_name`): its UTF-8 bytes percent-encoded,
    all but ASCII letters, digits, "_" and "-" ("a b" -> "a%20b", "猫" -> "%E7%8C%AB"; "." too, so no name
    is hidden or special; "" -> "%", a name no encoding gives)."""
    return "".join(chr(b) if chr(b) in FILE_SAFE else f"%{b:02X}" for b in text.encode()) or "%"


def class_name(stem: str) -> str:
    """The class name a `file_name` came from."""
    return "" if stem == "%" else urllib.parse.unquote(stem, errors="strict")


def write_pr_data(curves: dict, folder: Path) -> None:
    """One `recall,precision` CSV per class in `folder` (dvc.yaml names the folder: `dvc plots` draws a plot per
    file); files of classes no longer present go."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = set()
    for name, (recall, precision, _) in curves.items():
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(["recall", "precision"])
        out.writerows((f"{r:.4f}", f"{p:.4f}") for r, p in zip(recall, precision))
        keep.add(f"{file_name(name)}.csv")
        atomic_write(folder / f"{file_name(name)}.csv", lambda tmp, text=buf.getvalue(): tmp.write_text(text))
    for old in folder.glob("*.csv"):
        if old.name not in keep:
            old.unlink()


def plot_pr_curves(curves: dict, split: str, path: Path) -> None:
    """Every class's precision-recall curve on one axis, its average precision in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, (recall, precision, ap) in curves.items():
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02),
           title=f"{split}: precision-recall per class (one against the rest)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
