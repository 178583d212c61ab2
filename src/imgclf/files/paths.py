"""Every path and file name of the pipeline, relative to the project root (dvc.yaml says the same)."""

from __future__ import annotations

import os
from pathlib import Path

PARAMS_FILE = "params.yaml"                           # the one configuration file (validated by config.py)

# fingerprint -> data/fingerprint.json: what the data source holds now (prepare depends on it)
FINGERPRINT_JSON = "data/fingerprint.json"
RAW_DIR = "data/raw"                                  # images and archives kept inside the repo (`dvc add`)

# prepare -> data/prepared: one .npy per split and array, and the manifest describing them
PREPARED_DIR = "data/prepared"
MANIFEST = "manifest.json"                            # counts, class names, sha256 of every array, digest
SPLITS = ("train", "dev", "test")                     # "test" only when the source has one
CIFAR10_DEFAULT_PATH = f"{RAW_DIR}/cifar-10-python.tar.gz"  # where the cifar10 source downloads to

# train -> models/ and reports/
MODEL_PATH = "models/model.keras"                     # the trained net without optimizer state
CHECKPOINT_DIR = "models/checkpoint"                  # resumable state after each epoch (not a DVC output)
CHECKPOINT_STATE = "state.json"                       # inside CHECKPOINT_DIR: names the weights file it belongs to
REPORTS_DIR = "reports"
TRAIN_SUMMARY = "train.json"                          # early stop, epochs run, weights sha256 (git-tracked)
HISTORY_CSV = "history.csv"                           # one row per epoch (a DVC plot)
LOSS_PNG = "loss.png"
RUN_INFO = "run.json"                                 # MLflow run id and wall times: git-ignored, not a DVC output

# evaluate -> reports/
METRICS_JSON = "metrics.json"                         # DVC metrics
CLASSIFICATION_REPORT = "classification_report.json"  # per-class precision/recall/F1, confusion matrices
DEV_PREDICTIONS = "dev_predictions.csv"               # actual,predicted per dev image (DVC's confusion plot)
CONFUSION_PNG = "confusion_matrix.png"
MISTAKES_PNG = "mistakes.png"                         # the most confidently misclassified dev (and test) images
PR_CURVES_PNG = "pr_curves.png"                       # dev precision-recall per class
PR_DIR = "pr"                                         # reports/pr/<class %-encoded>.csv: the curves for `dvc plots`

# imgclf experiments -> reports/
EXPERIMENTS_MD = "experiments.md"
EXPERIMENTS_PNG = "experiments.png"

# The default MLflow store at the repo root (see tracking/); git and DVC ignore both.
MLFLOW_DB = "mlflow.db"
MLRUNS_DIR = "mlruns"


def repo_root() -> Path:
    """The project root: DVC_ROOT under `dvc repro`/`dvc exp run`, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
