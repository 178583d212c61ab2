"""A tracking store's failures as one line: which store, what went wrong (unreachable, failing, refusing a run
id) and how to carry on. Every module of this wing raises TrackingError."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import mlflow
import requests
import sqlalchemy.exc
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.utils.credentials import read_mlflow_creds

from imgclf.errors import ImgclfError


# What a failing tracking store raises: MLflow's own errors (HTTP failures after the retries come
# wrapped in them), and raw requests / SQLAlchemy errors from artifact uploads and sqlite set-up.
STORE_FAILURES = (mlflow.exceptions.MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError)


class TrackingError(ImgclfError):
    """The tracking server or store cannot be used, or a run id is unknown."""


def run_failure(run_id: str, exc: BaseException, fix: str) -> TrackingError:
    """One line for a run id MLflow refused: the store's failure when it is unreachable, else its reason."""
    if unreachable(exc):
        return store_failure(exc, fix)
    return TrackingError(f"MLflow run {run_id}: {str(exc).splitlines()[0]}; {fix}")


# A server behind MLflow's basic auth refuses a missing or wrong user (401) and a user without the permission (403).
REFUSED = {401: "Unauthorized", 403: "Forbidden"}


def credential_failure(uri: str, status: int) -> TrackingError:
    """One line for a server that refused this user: which variable to set or fix, and who makes members."""
    user = read_mlflow_creds().username
    head = f"MLflow tracking server {uri}: {status} {REFUSED[status]}"
    make = "a team admin makes members: imgclf-team user add NAME"
    if status == 403:
        return TrackingError(f"{head}: user {user} may not do this (a --read-only member?); use a member who may "
                             f"edit ({make})")
    if not user:
        return TrackingError(f"{head}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD ({make})")
    return TrackingError(f"{head}: user {user} or its password is not accepted; fix MLFLOW_TRACKING_USERNAME and "
                         f"MLFLOW_TRACKING_PASSWORD ({make})")


def store_failure(exc: BaseException, then: str) -> TrackingError:
    """One line naming the store's URI, what went wrong and what to do (`then`: how to carry on)."""
    uri = mlflow.get_tracking_uri()
    text = " ".join(str(exc).split()).split(" [SQL:")[0]
    refused = re.search(r"failed with error code (401|403)\b", text)
    if refused:
        return credential_failure(uri, int(refused.group(1)))
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
