"""Which MLflow store a command uses and whether it can: the URI (MLFLOW_TRACKING_URI, else the repo's sqlite
file), bounded HTTP retries, a server's reachability, a damaged or foreign sqlite file refused before MLflow
opens it, the lock that serialises creating a sqlite store, and a lost get-or-create race.

Tracking URI: MLFLOW_TRACKING_URI when set, else `sqlite:///<repo>/mlflow.db` with artifacts in
`<repo>/mlruns`, where <repo> is DVC_ROOT when DVC runs us (queued experiments run in temporary
copies that DVC deletes) or the working directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator

import mlflow
import requests
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from imgclf.files.paths import MLFLOW_DB, repo_root
from imgclf.tracking.failures import REFUSED, TrackingError, credential_failure, store_errors


# MLflow retries an HTTP request 7 times (backoff factor 2) and waits 120 s per try: a dead server
# stalls a run for minutes. These defaults give up after ~8 s on a dead server (4 tries, 0 + 2 + 4 s
# of backoff plus up to 1 s jitter each) and within ~2 min on a hung one; the user's settings win.
HTTP_DEFAULTS = {
    MLFLOW_HTTP_REQUEST_MAX_RETRIES: "3",
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: "1",
    MLFLOW_HTTP_REQUEST_TIMEOUT: "20",
}


def tracking_uri() -> tuple[str, bool]:
    """(uri, is_default): the user's MLFLOW_TRACKING_URI (a relative store path made absolute) or the repo's own
    sqlite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return absolute_uri(uri), False
    return f"sqlite:///{repo_root() / MLFLOW_DB}", True


def absolute_uri(uri: str) -> str:
    """A store URI whose path is relative (`sqlite:///mlflow.db`, `file:mlruns`, `mlruns`) made absolute against the
    working directory, where MLflow would look: the same store for the checks here and for a child process
    started elsewhere (`imgclf rerun` trains in a temporary worktree). Other URIs come back unchanged."""
    for prefix, absolute in (("sqlite:///", "sqlite:///"), ("file:", "file://")):  # + "/abs/path"
        path = uri.removeprefix(prefix)
        if uri.startswith(prefix) and path and not path.startswith(("/", ":memory:")):
            return f"{absolute}{Path(path).absolute()}"
    if ":" in uri.split("/")[0] or uri in ("databricks", "databricks-uc", "uc"):
        return uri  # a scheme (http:, postgresql:, file:/abs ...) or one of MLflow's named stores
    return str(Path(uri).absolute())  # a bare path: MLflow's file store


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError with one line naming the URI when an HTTP tracking server does not answer, or
    refuses this user (basic auth: 401, 403; /health answers anyone, so one request with the credentials)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        # MLflow's own timeout (HTTP_DEFAULTS): a server that answers /health may check a password slowly when busy.
        answer = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                              max_retries=0, raise_on_status=False, params={"max_results": 1})
    except (requests.RequestException, mlflow.exceptions.MlflowException) as exc:
        reason = type(exc).__name__
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix/unset MLFLOW_TRACKING_URI"
        ) from None
    if answer.status_code in REFUSED:
        raise credential_failure(uri, answer.status_code)


def configure() -> tuple[str, bool]:
    """Point MLflow at the tracking store with bounded HTTP retries; fail fast when a server is unreachable."""
    for variable, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(variable.name, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small download is noise
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
