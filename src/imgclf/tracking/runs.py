"""What each stage logs into its MLflow run: TrainingRun (start facts, per-epoch metrics, the end of training and
the model), NullRun for a non-chief multi-worker, EvaluationRun (the final scores and reports), and the helpers
they share. Tracker (tracker.py) opens and ends the runs; these only log into the active one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mlflow
import yaml

from imgclf.files.atomic import naming_failed_writes
from imgclf.files.code import code_digest
from imgclf.files.paths import HISTORY_CSV, LOSS_PNG
from imgclf.metrics import EPOCH_METRICS
from imgclf.tracking.context import EVALUATED, environment_tags, lineage_tags, run_params
from imgclf.tracking.keys import OUTCOME_METRICS, metric_history, metric_key
from imgclf.tracking.store import after_lost_race, store_lock


class TrainingRun:
    """What `train` logs into its MLflow run: start facts, per-epoch metrics, the end of training."""

    def __init__(self, run_id: str, register_as: str | None):
        self.run_id, self.register_as = run_id, register_as

    def log_start(self, params: dict, manifest: dict, model, device: str, tags: dict) -> None:
        """Params as used (flattened with dots), lineage and environment tags, the data as an input."""
        mlflow.log_params(run_params(params, model))  # equal values only, when resuming (see Tracker._may_reopen)
        mlflow.set_tags({
            **lineage_tags(),
            "code_digest": code_digest(),
            **environment_tags(device),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "data_digest": manifest["digest"],
            "dataset": manifest["dataset"],
            **({"variant": params["tracking"]["variant"]} if params["tracking"]["variant"] else {}),
            **tags,
        })
        with artifacts_written():
            mlflow.log_text(yaml.safe_dump(params, sort_keys=False), "params.yaml")
            mlflow.log_dict(manifest, "data/manifest.json")
        # MLflow's sqlite store gets-or-creates the dataset row without a lock, so two runs on the same data
        # starting together can both insert it (`UNIQUE constraint failed: datasets...`); a server, too (no lock).
        def log_input():
            mlflow.log_input(_prepared_dataset(manifest), context="training")

        with store_lock(mlflow.get_tracking_uri()):
            after_lost_race(log_input, log_input)  # again: the dataset row exists now, this call links it

    def log_missing_epochs(self, history: list[dict]) -> None:
        """After a resume: log the checkpointed epochs the interrupted process did not get to log."""
        logged = {m.step for m in metric_history(mlflow.tracking.MlflowClient(), self.run_id, "loss")}
        for row in history:
            if row["epoch"] not in logged:
                log_epoch(row, row["epoch"])

    def epoch_callback(self):
        """A Keras callback logging each epoch's metrics with step = epoch (1-based)."""
        return epoch_logger()

    def log_training_end(self, summary: dict, model, reports_dir: Path, log_model) -> None:
        """How training ended (metrics and tags), artifacts and the model, which `log_model(model, register_as=...)`
        logs (serving.pyfunc's: the served model is that wing's)."""
        ended = {k: summary[k] for k in (*OUTCOME_METRICS, "stop_reason")}
        mlflow.set_tags({**{k: str(v) for k, v in ended.items()}, "weights_sha256": summary["weights_sha256"],
                         "early_stopping_monitor": summary["monitor"],
                         "early_stopping_patience": str(summary["patience"])})
        # Results, not settings: metrics, as MLflow's Keras autolog logs its callback's stopped_epoch, so Compare
        # shows them beside the scores and not among the params. early_stopped's point marks the stopping epoch.
        mlflow.log_metrics({k: float(summary[k]) for k in OUTCOME_METRICS},
                           step=summary["stopped_epoch"] or summary["epochs_run"])
        mlflow.set_tag("collapsed", str(summary["collapsed"]).lower())
        if summary["collapsed"]:
            mlflow.set_tag("collapsed_epoch", str(summary["collapsed_epoch"]))
            mlflow.log_metric("collapsed", 1.0, step=summary["collapsed_epoch"])
        mlflow.log_metrics({"epochs_run": summary["epochs_run"], "train_seconds": summary["train_seconds"]})
        with artifacts_written():
            for name in (HISTORY_CSV, LOSS_PNG):
                mlflow.log_artifact(str(reports_dir / name))
            log_model(model, register_as=self.register_as)


class EvaluationRun:
    """What `evaluate` logs into its run (the training run reopened, or its own; see Tracker.evaluation_run)."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_final(self, metrics: dict[str, float], step: int, reports: list[Path], texts: dict[str, str]) -> None:
        """The final scores at the last epoch's step, the reports and `texts` ({artifact name: text}); then the
        `evaluated` tag, which is what tells these final scores from training's per-epoch ones."""
        # The scores go to the logged model too (MLflow's model view and the registry show them); logged with its
        # id, a point is the run's as well, so each key is logged once.
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()}, step=step,
                           model_id=logged_model_id(mlflow.get_run(self.run_id)))
        for path in reports:
            mlflow.log_artifact(str(path))
        for name, text in texts.items():
            mlflow.log_text(text, name)
        mlflow.set_tag(EVALUATED, "true")


def artifacts_written() -> contextlib.AbstractContextManager:
    """A local artifact store that cannot be written (a full disk) names its folder, as any other output."""
    uri = mlflow.get_artifact_uri()
    return naming_failed_writes(Path(uri.removeprefix("file://")) if uri.startswith("file://") else Path(uri))


class NullRun:
    """The TrainingRun of a non-chief multi-worker: the same calls, nothing logged, nothing written."""

    run_id = None

    def log_missing_epochs(self, history: list[dict]) -> None:
        """Nothing to re-log: the chief logs every epoch."""

    def epoch_callback(self):
        """A callback that does nothing (the chief's epoch_logger logs the epoch)."""
        import keras

        return keras.callbacks.Callback()

    def log_training_end(self, summary: dict, model, reports_dir, log_model) -> None:
        """The chief logs the model and reports."""


def _prepared_dataset(manifest: dict):
    """An MLflow dataset entry for the prepared arrays, its digest taken from the manifest."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(str(manifest["source"].get("path") or f"bundled:{manifest['dataset']}"))
    # MLflow caps dataset digests at 36 characters; the full sha256 is the data_digest tag.
    return MetaDataset(source=source, name=f"{manifest['dataset']}-prepared", digest=manifest["digest"][:36])


def log_epoch(logs: dict, step: int) -> None:
    """Log an epoch's loss, loss_sum, dev metrics, early-stopping wait and time at step = epoch."""
    mlflow.log_metrics({metric_key(k): float(logs[k]) for k in EPOCH_METRICS if k in logs}, step=step)


def epoch_logger():
    """A Keras callback calling log_epoch after each epoch. Keras is imported here, not with this module:
    the commands that only orchestrate (`imgclf experiments`, `imgclf-team`) start ~5 s faster."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            log_epoch(logs, epoch + 1)

    return EpochLogger()


def logged_model_id(run) -> str | None:
    """The id of the model a run logged (MLflow 3's LoggedModel: what the registry and the model view show), if any."""
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None
