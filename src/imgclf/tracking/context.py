"""What a run is named and tagged with, from the process and the repo: its name, its params as MLflow logs them,
git lineage (the baseline commit under `dvc exp run`) and the environment that decides the weights. Nothing
here talks to MLflow."""

from __future__ import annotations

import os
import platform
import secrets
import subprocess
from pathlib import Path
from typing import Any

from imgclf.files.code import uncommitted
from imgclf.training.numerics import cpu_facts


EVALUATED = "evaluated"  # tag set by `evaluate` once a run holds its final scores: the experiments table counts these
PER_CLASS = "f1_per_class"  # runs evaluated before #43 logged `dev_f1_per_class/<class>` metrics (and no tag)


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'keep_prob': 0.6}} -> {'train.keep_prob': 0.6}: params as MLflow logs them."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_params(params: dict, model) -> dict[str, str]:
    """What a training run logs as params, as MLflow stores them (strings)."""
    return {k: str(v) for k, v in {**flatten(params), "model.num_params": model.count_params()}.items()}


def run_name(params: dict, dataset: str, role: str = "") -> str:
    """DVC's experiment name under `dvc exp run`, else `<family>-<dataset>-seed<seed>[-<role>]-<6 hex>`.

    MLflow would draw its own name from Python's `random`, which train has just seeded: every run of a seed
    would get the same name. The suffix comes from os.urandom instead.
    """
    parts = [params["model"]["arch"], dataset, f"seed{params['seed']}", role, secrets.token_hex(3)]
    return os.environ.get("DVC_EXP_NAME") or "-".join(p for p in parts if p)


def git_facts(root: Path) -> dict[str, str]:
    """The commit of the repo at `root`, and whether the train stage's code differs from it (`git_dirty`:
    its modules, new ones included, or requirements.lock; params.yaml and dvc.lock are not code, and DVC
    rewrites dvc.lock as stages finish), with the first such files; 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = uncommitted(root)
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(changed)),
            **({"git_dirty_files": ", ".join(changed)[:500]} if changed else {})}


def lineage_tags() -> dict[str, str]:
    """git_commit and git_dirty of the tree this run trains from; under `dvc exp run`, its baseline commit.

    A queued experiment may run hours after it was queued, in DVC's temporary copy, while the workspace
    (DVC_ROOT) is at another commit by then: the commit is the experiment's baseline (DVC_EXP_BASELINE_REV),
    and the dirty flag that of the tree the stage runs in (the working directory: DVC's copy, or the workspace).
    """
    facts = git_facts(Path.cwd())
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        facts |= {"git_commit": baseline, "dvc_exp_baseline_rev": baseline}
    return facts


def environment_tags(device: str) -> dict[str, str]:
    """Everything that can break bit-identity between two runs: versions, device, CPU ISA, threads."""
    import keras
    import numpy
    import tensorflow as tf

    return {
        "python_version": platform.python_version(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "numpy_version": numpy.__version__,
        "platform": platform.platform(),
        "device": device,
        "cpu_count": str(os.cpu_count()),
        "tf_intra_op_threads": str(tf.config.threading.get_intra_op_parallelism_threads()),
        "tf_inter_op_threads": str(tf.config.threading.get_inter_op_parallelism_threads()),
        **cpu_facts(),
    }
