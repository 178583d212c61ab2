"""MLflow tracking: one pipeline run = one MLflow run, opened by `train` and closed by `evaluate`.

Tracking URI: MLFLOW_TRACKING_URI when set, else `sqlite:///<repo>/mlflow.db` with artifacts in
`<repo>/mlruns`, where <repo> is DVC_ROOT when DVC runs us (queued experiments run in temporary
copies that DVC deletes) or the working directory.

Failures of the store never pass silently or hang: HTTP retries are bounded (HTTP_DEFAULTS), a
store error in the middle of a run becomes one TrackingError line naming the URI, and creating a
sqlite store is serialised so concurrent experiments can share one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import secrets
import socket
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
import requests
import sqlalchemy.exc
import yaml
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)

from imgclf.errors import ImgclfError, one_line
from imgclf.files.atomic import naming_failed_writes
from imgclf.training.machine import cpu_facts
from imgclf.metrics import EPOCH_METRICS
from imgclf.files.paths import HISTORY_CSV, LOSS_PNG, MLFLOW_DB, MLRUNS_DIR, repo_root

KILLED_BY = (KeyboardInterrupt, SystemExit)
# What a failing tracking store raises: MLflow's own errors (HTTP failures after the retries come
# wrapped in them), and raw requests / SQLAlchemy errors from artifact uploads and sqlite set-up.
STORE_FAILURES = (mlflow.exceptions.MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError)
# MLflow retries an HTTP request 7 times (backoff factor 2) and waits 120 s per try: a dead server
# stalls a run for minutes. These defaults give up after ~8 s on a dead server (4 tries, 0 + 2 + 4 s
# of backoff plus up to 1 s jitter each) and within ~2 min on a hung one; the user's settings win.
HTTP_DEFAULTS = {
    MLFLOW_HTTP_REQUEST_MAX_RETRIES: "3",
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: "1",
    MLFLOW_HTTP_REQUEST_TIMEOUT: "20",
}


class TrackingError(ImgclfError):
    """The tracking server or store cannot be used, or a run id is unknown."""


RESUME = "rerun: training resumes from its last checkpoint"
EVALUATED = "evaluated"  # tag set by `evaluate` once a run holds its final scores: the experiments table counts these


def tracking_uri() -> tuple[str, bool]:
    """(uri, is_default): the user's MLFLOW_TRACKING_URI or the repo's own sqlite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, False
    return f"sqlite:///{repo_root() / MLFLOW_DB}", True


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError with one line naming the URI when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix/unset MLFLOW_TRACKING_URI"
        ) from None


def configure() -> tuple[str, bool]:
    """Point MLflow at the tracking store with bounded HTTP retries; fail fast when a server is unreachable."""
    for variable, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(variable.name, value)
    uri, is_default = tracking_uri()
    check_reachable(uri)
    with store_lock(uri):  # under the lock: another process may be creating the store's tables right now
        check_sqlite_store(uri)
        mlflow.set_tracking_uri(uri)
        with store_errors("rerun"):
            mlflow.search_experiments(max_results=1)  # creates a fresh sqlite store's tables, under the lock
    return uri, is_default


SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = {"alembic_version", "experiments", "runs", "metrics"}
# How long a store that another process holds locked is waited for before giving up with one line
# (MLflow itself waits this long for a busy sqlite database on every write).
STORE_BUSY_SECONDS = 20.0


def check_sqlite_store(uri: str) -> None:
    """Refuse, before MLflow opens it, an existing sqlite store that is damaged or not MLflow's.

    MLflow would create its tables inside an empty or foreign SQLite file, and a damaged one fails in the
    middle of a run. The check only reads (a read-only connection): the file is never modified.
    """
    path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if path is None or not path.is_file():
        return  # not sqlite, or a new store MLflow creates
    fix = f"move it aside (mv {path} {path}.bad) to start a new store, or restore it from a backup; it was not modified"
    problem = _sqlite_file_problem(path) or _sqlite_tables_problem(path)
    if problem:
        raise TrackingError(f"MLflow tracking store {path}: {problem}; {fix}")


def _sqlite_file_problem(path: Path) -> str | None:
    """What is wrong with the file itself (empty, not SQLite, shorter than its header says), else None."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(100)
    if size == 0:
        return "empty file (0 bytes), not an MLflow store"
    if not header.startswith(SQLITE_HEADER):
        return f"not an SQLite database (starts with {header[:16]!r})"
    page_size = int.from_bytes(header[16:18], "big") if len(header) == 100 else 0
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big") if len(header) == 100 else 0
    if not page_size or size % page_size or size < pages * page_size:
        return f"truncated ({size} bytes; its header says {pages} pages of {page_size} bytes)"
    return None


def _sqlite_tables_problem(path: Path) -> str | None:
    """Whether the database reads back whole and holds MLflow's tables; waits STORE_BUSY_SECONDS for a lock."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True,
                                                timeout=STORE_BUSY_SECONDS)) as db:
            check = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise TrackingError(f"MLflow tracking store {path}: locked by another process for more than "
                                f"{STORE_BUSY_SECONDS:.0f} s (`fuser {path}` names it); wait for it to finish "
                                "or stop it, then rerun") from None
        if "readonly" in str(exc):
            return None  # a hot journal left by a killed writer: MLflow's read-write connection rolls it back
        return f"damaged ({exc})"
    except sqlite3.DatabaseError as exc:
        return f"damaged ({exc})"
    if check != "ok":
        return f"damaged (sqlite quick_check: {check})"
    missing = sorted(MLFLOW_TABLES - tables)
    if missing:
        return f"an SQLite database but not an MLflow store (no {', '.join(missing)} table)"
    return None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, hold an exclusive lock shared by every imgclf process on this machine.

    MLflow creates a fresh sqlite store's tables without any lock, so two queued experiments
    starting together crash with `table ... already exists`; getting-or-creating the experiment
    and the dataset row race the same way. Other stores need no lock.
    """
    if not uri.startswith("sqlite:"):
        yield
        return
    import fcntl

    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"imgclf-{os.getuid()}-{key}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def after_lost_race(insert, recover):
    """`insert()`; when it loses a get-or-create race (another process added the same experiment or dataset row
    between MLflow's lookup and its insert), `recover()`, which finds that row now.

    store_lock serialises one machine's processes on a sqlite file; a tracking server has no lock across its
    clients, and answers the losing insert with a unique-key violation (PostgreSQL) or RESOURCE_ALREADY_EXISTS.
    """
    try:
        return insert()
    except mlflow.exceptions.MlflowException as exc:
        text = str(exc)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" and "UNIQUE constraint failed" not in text \
                and "duplicate key value violates unique constraint" not in text:
            raise
        return recover()


def run_failure(run_id: str, exc: BaseException, fix: str) -> TrackingError:
    """One line for a run id MLflow refused: the store's failure when it is unreachable, else its reason."""
    if unreachable(exc):
        return store_failure(exc, fix)
    return TrackingError(f"MLflow run {run_id}: {str(exc).splitlines()[0]}; {fix}")


def store_failure(exc: BaseException, then: str) -> TrackingError:
    """One line naming the store's URI, what went wrong and what to do (`then`: how to carry on)."""
    uri = mlflow.get_tracking_uri()
    text = " ".join(str(exc).split()).split(" [SQL:")[0]
    if unreachable(exc):
        retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
        # A server that answers every try with a 5xx is up but failing: its own log says why, not the network.
        status = re.search(r"too many (\d{3}) error responses", text)
        if status:
            return TrackingError(f"MLflow tracking server {uri} answered HTTP {status.group(1)} to every try (gave up "
                                 f"after {retries} retries); its log says why: fix the server, then {then}")
        errno = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text)
        why = "timed out" if "timeout" in text.lower() else errno.group(1).strip().lower() if errno else "no answer"
        return TrackingError(f"MLflow tracking server {uri} stopped answering ({why}, gave up after {retries} "
                             f"retries); restart it or fix MLFLOW_TRACKING_URI, then {then}")
    return TrackingError(f"MLflow tracking store {uri} failed ({text[:200]}); fix it or unset "
                         f"MLFLOW_TRACKING_URI, then {then}")


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the server did not answer (MLflow wraps HTTP failures after its retries)."""
    return isinstance(exc, (requests.ConnectionError, requests.Timeout)) or str(exc).startswith("API request to")


@contextlib.contextmanager
def store_errors(then: str) -> Iterator[None]:
    """Turn a store failure raised inside the block into a one-line TrackingError (see store_failure)."""
    try:
        yield
    except STORE_FAILURES as exc:
        raise store_failure(exc, then) from None


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


def owner_tags() -> dict[str, str]:
    """The process writing a run, so that a later run can tell a run left RUNNING by a kill -9 from a live one."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # pids name the same process only within one namespace
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "pid_namespace": namespace, "pid": str(os.getpid())}


def _process_gone(pid: str) -> bool:
    """Whether no process `pid` exists on this machine (False when unsure: never end a live run)."""
    if not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    return False


def _end_if_orphan(client, run, me: dict[str, str]) -> None:
    """End `run` KILLED if it is RUNNING although the process of this machine that wrote it is gone (a kill -9).

    Only when that process is known to be dead: a queued experiment training beside this one, or a run of
    another machine or pid namespace, stays RUNNING.
    """
    tags = run.data.tags
    if run.info.status == "RUNNING" and all(tags.get(k) == me[k] for k in ("host", "pid_namespace")) \
            and _process_gone(tags.get("pid", "")):
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"MLflow run {run.info.run_id} ({run.info.run_name}) was left RUNNING by process {tags['pid']}, "
              "which is gone: ended it KILLED")


def _claim(run_id: str) -> None:
    """Record this process as the run's writer before reopening it, so no other process takes it for an orphan."""
    from mlflow.entities import RunTag

    mlflow.tracking.MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])


def git_facts(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the repo (tracked files only), or 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain", "-uno")))}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


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

    def __init__(self, experiment_id: str, register_as: str | None):
        self.experiment_id, self.register_as = experiment_id, register_as

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
                return cls(experiment_id, tracking_cfg["register_model"])
        return cls(experiment.experiment_id, tracking_cfg["register_model"])

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
        if resume_run_id and self._may_reopen(resume_run_id, params):
            _claim(resume_run_id)
            return mlflow.start_run(run_id=resume_run_id)
        if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` made the run already: log into it
            run = mlflow.start_run()
            mlflow.set_tags(owner_tags())
            return run
        return self._new_run(name)

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
            _end_if_orphan(client, run, owner_tags())  # it may be in another experiment than the new run
        return not changed

    def _new_run(self, name: str):
        """A new run of the experiment, named `name` and owned by this process; ends the orphans first."""
        self._end_orphans()
        return mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=owner_tags())

    def _end_orphans(self) -> None:
        """End KILLED the experiment's runs that a process of this machine left RUNNING when it died."""
        me, client = owner_tags(), mlflow.tracking.MlflowClient()
        query = f"attributes.status = 'RUNNING' and tags.host = '{me['host']}'"
        for run in client.search_runs([self.experiment_id], query):
            _end_if_orphan(client, run, me)

    @contextlib.contextmanager
    def evaluation_run(self, run_id: str | None, weights_sha256: str, tta: str, name: str) -> Iterator[str]:
        """The run that trained this model, reopened for its evaluation; it ends FINISHED, FAILED or KILLED.

        A new run named `name` (tagged `evaluation_of` and `weights_sha256`) instead when this machine has no
        record of the training run (reports/run.json), or the run logged another `evaluate.tta`: a run's params
        must describe its metrics.
        """
        reopen = self._evaluates_as_trained(run_id, tta)
        try:
            if reopen:
                _claim(run_id)
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
                yield mlflow.active_run().info.run_id

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


class TrainingRun:
    """What `train` logs into its MLflow run: start facts, per-epoch metrics, the end of training."""

    def __init__(self, run_id: str, register_as: str | None):
        self.run_id, self.register_as = run_id, register_as

    def log_start(self, params: dict, manifest: dict, model, device: str, tags: dict) -> None:
        """Params as used (flattened with dots), lineage and environment tags, the data as an input."""
        mlflow.log_params(run_params(params, model))  # equal values only, when resuming (see Tracker._may_reopen)
        mlflow.set_tags({
            **lineage_tags(),
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
        logged = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(self.run_id, "loss")}
        for row in history:
            if row["epoch"] not in logged:
                log_epoch(row, row["epoch"])

    def epoch_callback(self):
        """A Keras callback logging each epoch's metrics with step = epoch (1-based)."""
        return epoch_logger()

    def log_training_end(self, summary: dict, model, reports_dir: Path) -> None:
        """How training ended (params, tags and a metric point at an early stop), artifacts and the model."""
        ended = {k: summary[k] for k in ("early_stopped", "stopped_epoch", "best_epoch", "best_loss", "stop_reason")}
        mlflow.log_params(ended)
        mlflow.set_tags({**{k: str(v) for k, v in ended.items()}, "weights_sha256": summary["weights_sha256"],
                         "early_stopping_monitor": summary["monitor"],
                         "early_stopping_patience": str(summary["patience"])})
        if summary["early_stopped"]:
            mlflow.log_metric("early_stopped", 1.0, step=summary["stopped_epoch"])
        mlflow.set_tag("collapsed", str(summary["collapsed"]).lower())
        if summary["collapsed"]:
            mlflow.set_tag("collapsed_epoch", str(summary["collapsed_epoch"]))
            mlflow.log_metric("collapsed", 1.0, step=summary["collapsed_epoch"])
        mlflow.log_metrics({"epochs_run": summary["epochs_run"], "train_seconds": summary["train_seconds"]})
        with artifacts_written():
            for name in (HISTORY_CSV, LOSS_PNG):
                mlflow.log_artifact(str(reports_dir / name))
            log_keras_model(model, self.register_as)


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

    def log_training_end(self, summary: dict, model, reports_dir) -> None:
        """The chief logs the model and reports."""


class NullTracker:
    """Tracker for non-chief workers: never connects to MLflow, never creates a store."""

    @contextlib.contextmanager
    def training_run(self, *args, **kwargs) -> Iterator[NullRun]:
        """Same signature as Tracker.training_run; yields a NullRun."""
        yield NullRun()


def _prepared_dataset(manifest: dict):
    """An MLflow dataset entry for the prepared arrays, its digest taken from the manifest."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(str(manifest["source"].get("path") or f"bundled:{manifest['dataset']}"))
    # MLflow caps dataset digests at 36 characters; the full sha256 is the data_digest tag.
    return MetaDataset(source=source, name=f"{manifest['dataset']}-prepared", digest=manifest["digest"][:36])


def log_epoch(logs: dict, step: int) -> None:
    """Log an epoch's loss, loss_sum, dev metrics, early-stopping wait and time at step = epoch."""
    mlflow.log_metrics({k: float(logs[k]) for k in EPOCH_METRICS if k in logs}, step=step)


def epoch_logger():
    """A Keras callback calling log_epoch after each epoch. Keras is imported here, not with this module:
    the commands that only orchestrate (`imgclf experiments`, `imgclf-team`) start ~5 s faster."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            log_epoch(logs, epoch + 1)

    return EpochLogger()


def log_keras_model(model, register_as: str | None) -> None:
    """Log the Keras model with a signature (input_example crashes in MLflow 3.17) for pyfunc use."""
    import keras
    import numpy as np
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *model.input_shape[1:]), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.output_shape[-1]), "logits")]),
    )
    # Explicit requirements: MLflow's inference would import the model in a subprocess (slow).
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
    mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=requirements,
                           registered_model_name=register_as)
