"""MLflow tracking: one pipeline run = one MLflow run, opened by `train` and closed by `evaluate`.

The Tracker connects to the store (store.py), opens, reopens and ends pipeline runs (ending the orphans of
dead processes first, orphans.py), and hands each stage its run's handle (runs.py). Failures of the store
never pass silently or hang: HTTP retries are bounded (store.HTTP_DEFAULTS), a store error in the middle of a
run becomes one TrackingError line naming the URI (failures.py), and creating a sqlite store is serialised so
concurrent experiments can share one.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import mlflow
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

from imgclf.errors import one_line
from imgclf.files.paths import MLRUNS_DIR, repo_root
from imgclf.tracking.context import run_name, run_params
from imgclf.tracking.failures import STORE_FAILURES, TrackingError, run_failure, store_errors, store_failure, unreachable
from imgclf.tracking.orphans import claim, end_if_orphan, owner_tags
from imgclf.tracking.runs import EvaluationRun, NullRun, TrainingRun, artifacts_written
from imgclf.tracking.store import after_lost_race, configure, store_lock

KILLED_BY = (KeyboardInterrupt, SystemExit)


RESUME = "rerun: training resumes from its last checkpoint"


@contextlib.contextmanager
def _ends_active_run(then: str) -> Iterator[None]:
    """End the active run FINISHED, or KILLED (Ctrl-C/SIGTERM) / FAILED when the block raises.

    A store failure inside the block (or while ending the run) becomes a one-line TrackingError
    that says how to carry on (`then`); the run is then ended with a single quick try, because
    the store that just failed would otherwise be retried all over again.
    """
    try:
        with store_errors(then):
            yield
            mlflow.end_run("FINISHED")
    except TrackingError as exc:
        _end_run_quietly("FAILED", exc, retries=0)
        raise
    except BaseException as exc:
        _end_run_quietly("KILLED" if isinstance(exc, KILLED_BY) else "FAILED", exc)
        raise


def _end_run_quietly(status: str, exc: BaseException, retries: int | None = None) -> None:
    """End the active run (if any) with `status`, a FAILED one tagged `failure_reason` (the error's line);
    a store failure here must not hide the real error."""
    name = MLFLOW_HTTP_REQUEST_MAX_RETRIES.name
    saved = os.environ.get(name)
    if retries is not None:
        os.environ[name] = str(retries)
    try:
        if status == "FAILED" and mlflow.active_run():
            with contextlib.suppress(*STORE_FAILURES):
                mlflow.set_tag("failure_reason", one_line(exc)[:5000])  # MLflow caps tag values at 8000 chars
        mlflow.end_run(status)
    except STORE_FAILURES:
        pass  # mlflow.end_run pops the local run first: nothing stays active
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


class Tracker:
    """The configured MLflow store and experiment; opens and reopens pipeline runs."""

    def __init__(self, experiment_id: str, register_as: str | None, system_metrics: bool = False):
        self.experiment_id, self.register_as, self.system_metrics = experiment_id, register_as, system_metrics

    @classmethod
    def connect(cls, tracking_cfg: dict) -> "Tracker":
        """Point MLflow at the store, fail fast when unreachable, and get or create the experiment."""
        uri, is_default = configure()
        name = tracking_cfg["experiment"]
        with store_lock(uri), store_errors("rerun"):  # the lock: two new runs must not both create it
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                artifacts = (repo_root() / MLRUNS_DIR).as_uri() if is_default else None
                experiment_id = after_lost_race(lambda: mlflow.create_experiment(name, artifact_location=artifacts),
                                                lambda: mlflow.get_experiment_by_name(name).experiment_id)
                experiment = mlflow.get_experiment(experiment_id)
        return cls(experiment.experiment_id, tracking_cfg["register_model"], tracking_cfg["system_metrics"])

    @contextlib.contextmanager
    def training_run(self, params: dict, manifest: dict, model, device: str, resume_run_id: str | None = None,
                     tags: dict | None = None) -> Iterator["TrainingRun"]:
        """A run holding params and lineage (the interrupted one when resuming, unless it logged other
        params: then a new run tagged `resumed_from`); it ends FAILED on an error and KILLED on Ctrl-C/SIGTERM."""
        with store_errors(RESUME):
            run = self._start(resume_run_id, run_params(params, model), run_name(params, manifest["dataset"]))
        with _ends_active_run(RESUME):
            handle = TrainingRun(run.info.run_id, self.register_as)
            resumed = {"resumed_from": resume_run_id} if resume_run_id not in (None, handle.run_id) else {}
            handle.log_start(params, manifest, model, device, {**(tags or {}), **resumed})
            yield handle

    def _start(self, resume_run_id: str | None, params: dict[str, str], name: str):
        """Reopen the run a checkpoint names, else join `mlflow run`'s run, else start a new one."""
        sampled = {"log_system_metrics": self.system_metrics}  # MLflow's own sampler, while training runs
        if resume_run_id and self._may_reopen(resume_run_id, params):
            claim(resume_run_id)
            return mlflow.start_run(run_id=resume_run_id, **sampled)
        if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` made the run already: log into it
            run = mlflow.start_run(**sampled)
            mlflow.set_tags(owner_tags())
            return run
        return self._new_run(name, **sampled)

    @staticmethod
    def _may_reopen(run_id: str, params: dict[str, str]) -> bool:
        """Whether the checkpoint's run is in this store and logged no other value of these params.

        A run's params must describe its metrics: when a param outside the checkpoint's fingerprint changed
        (data.path, evaluate.tta, tracking.*), training still resumes from the checkpoint, in a new run.
        """
        client = mlflow.tracking.MlflowClient()
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            if unreachable(exc):
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            print(f"MLflow run {run_id} of the checkpoint is not in this store; starting a new run")
            return False
        changed = sorted(k for k, v in params.items() if run.data.params.get(k, v) != v)
        if changed:
            print(f"{', '.join(changed)} differ from MLflow run {run_id} of the checkpoint: training resumes from "
                  "the checkpoint in a new run (tag resumed_from), as a run's params must describe its metrics")
            end_if_orphan(client, run, owner_tags())  # it may be in another experiment than the new run
        return not changed

    def _new_run(self, name: str, log_system_metrics: bool = False):
        """A new run of the experiment, named `name` and owned by this process; ends the orphans first."""
        self._end_orphans()
        return mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=owner_tags(),
                                log_system_metrics=log_system_metrics)

    def _end_orphans(self) -> None:
        """End KILLED the experiment's runs that a process of this machine left RUNNING when it died."""
        me, client = owner_tags(), mlflow.tracking.MlflowClient()
        query = f"attributes.status = 'RUNNING' and tags.host = '{me['host']}'"
        for run in client.search_runs([self.experiment_id], query):
            end_if_orphan(client, run, me)

    @contextlib.contextmanager
    def evaluation_run(self, run_id: str | None, weights_sha256: str, tta: str,
                       name: str) -> Iterator[EvaluationRun]:
        """The run that trained this model, reopened for its evaluation; it ends FINISHED, FAILED or KILLED.

        A new run named `name` (tagged `evaluation_of` and `weights_sha256`) instead when this machine has no
        record of the training run (reports/run.json), or the run logged another `evaluate.tta`: a run's params
        must describe its metrics.
        """
        reopen = self._evaluates_as_trained(run_id, tta)
        try:
            if reopen:
                claim(run_id)
                mlflow.start_run(run_id=run_id)
            else:
                self._new_run(name)
        except mlflow.exceptions.MlflowException as exc:
            raise run_failure(run_id or "(new)", exc, "rerun the evaluate stage") from None
        with _ends_active_run("rerun the evaluate stage"):
            if not reopen:
                mlflow.set_tags({"weights_sha256": weights_sha256, "evaluation_of": run_id or "unknown"})
                mlflow.log_param("evaluate.tta", tta)
            with artifacts_written():
                yield EvaluationRun(mlflow.active_run().info.run_id)

    @staticmethod
    def _evaluates_as_trained(run_id: str | None, tta: str) -> bool:
        """Whether the evaluation belongs in training run `run_id` (it exists and logged this evaluate.tta)."""
        if run_id is None:
            print("No record of the MLflow run that trained this model (reports/run.json): logging the "
                  "evaluation into a new run")
            return False
        try:
            logged = mlflow.tracking.MlflowClient().get_run(run_id).data.params.get("evaluate.tta", tta)
        except mlflow.exceptions.MlflowException as exc:
            if unreachable(exc):
                raise store_failure(exc, "rerun the evaluate stage") from None
            print(f"MLflow run {run_id} is not in this store: logging the evaluation into a new run")
            return False
        if logged != tta:
            print(f"evaluate.tta={tta} differs from training run {run_id}'s ({logged}): logging the evaluation "
                  "into a new run")
        return logged == tta


class NullTracker:
    """Tracker for non-chief workers: never connects to MLflow, never creates a store."""

    @contextlib.contextmanager
    def training_run(self, *args, **kwargs) -> Iterator[NullRun]:
        """Same signature as Tracker.training_run; yields a NullRun."""
        yield NullRun()
