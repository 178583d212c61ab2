"""`imgclf promote RUN_ID [--alias champion]`: point a registry alias at a run's model version.

MLflow deprecated stages (Staging, Production) for aliases: `models:/NAME@champion` then names whatever version
holds the alias, for `imgclf predict --model` and `mlflow models serve`. The run's model is registered first if it
has no version yet. A run that scores below the alias's current holder on the same dev data (the same
`data_digest`) is refused in one line unless --force; so is a run evaluated on other data (a smoke run with
data.max_train_samples, another data set), whose score says nothing against the holder's.
Who promoted which run, when and why is kept as the version's tags.
"""

from __future__ import annotations

import datetime
import getpass
import re
import socket

from imgclf.errors import ImgclfError
from imgclf.tracking.keys import run_metric

SCORE = "dev_f1_macro"  # the final dev macro-F1 `evaluate` logs (its last value), as tracking/keys.py names it
RUN_ID = re.compile(r"[0-9a-zA-Z][\w-]{0,255}")  # what MLflow accepts as a run id


def model_name(run, name: str | None) -> str:
    """--name, else the run's tracking.register_model, else its experiment's name."""
    import mlflow

    if name:
        return name
    registered = run.data.params.get("tracking.register_model")
    if registered and registered != "None":
        return registered
    return mlflow.tracking.MlflowClient().get_experiment(run.info.experiment_id).name


def score(run) -> float:
    """The run's final dev macro-F1; a run evaluate never finished has none to promote on."""
    from imgclf.tracking.context import EVALUATED

    value = run_metric(run, SCORE)
    if run.data.tags.get(EVALUATED) != "true" or value is None:
        raise ImgclfError(f"MLflow run {run.info.run_id} has no final {SCORE} (its evaluate stage did not finish); "
                          "evaluate it first (`dvc repro`), or pick an evaluated run in `mlflow ui`")
    return value


def version_of(client, name: str, run) -> str:
    """The run's model version under `name`, registered now if it has none."""
    import mlflow

    from imgclf.tracking.runs import logged_model_id

    # The filter holds only the store's own run id, checked to be [0-9a-zA-Z_-]; the name (any text, quotes
    # included) is compared here, never spliced into MLflow's filter language.
    if not RUN_ID.fullmatch(run.info.run_id):
        raise ImgclfError(f"MLflow run id {run.info.run_id!r} is not an MLflow run id; check it in `mlflow ui`")
    versions = [v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'") if v.name == name]
    if versions:
        return max(versions, key=lambda v: int(v.version)).version
    model_id = logged_model_id(run)
    if model_id is None:
        raise ImgclfError(f"MLflow run {run.info.run_id} logged no model (an evaluation-only run?); promote the run "
                          "that trained it (its evaluation_of tag)")
    print(f"Registering the model of MLflow run {run.info.run_id} as {name}")
    return mlflow.register_model(f"models:/{model_id}", name).version


def current_holder(client, name: str, alias: str):
    """(version, run) holding `alias` of `name`, or None."""
    import mlflow

    try:
        version = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None  # no such model or alias yet
    return version, client.get_run(version.run_id)


def check_not_worse(run, held, alias: str, force: bool) -> str:
    """Why the promotion is fine (the line recorded as `promote_reason`), or a one-line refusal."""
    new = score(run)
    if held is None:
        return f"first @{alias}: {SCORE} {new:.4f}"
    version, holder = held
    theirs, ours = holder.data.tags.get("data_digest", "?"), run.data.tags.get("data_digest", "?")
    if theirs != ours:
        if not force:
            raise ImgclfError(f"MLflow run {run.info.run_id} was evaluated on other data (data_digest {ours[:12]}) "
                              f"than version {version.version} (run {holder.info.run_id}, {theirs[:12]}), @{alias} "
                              f"now: their {SCORE} cannot be compared; pass --force to promote it anyway")
        return f"{SCORE} {new:.4f} on other dev data than version {version.version} (not compared, --force)"
    old = run_metric(holder, SCORE)
    old = float("-inf") if old is None else old
    if new < old and not force:
        raise ImgclfError(f"MLflow run {run.info.run_id} scores {SCORE} {new:.4f}, below {old:.4f} of version "
                          f"{version.version} (run {holder.info.run_id}), @{alias} now, on the same dev data; "
                          "keep it, or pass --force to promote anyway")
    return f"{SCORE} {new:.4f} against {old:.4f} of version {version.version}" + (" (--force)" if new < old else "")


def main(run_id: str, alias: str = "champion", name: str | None = None, force: bool = False) -> str:
    """Set `alias` on RUN_ID's model version; return `models:/NAME@ALIAS`."""
    import mlflow

    from imgclf.tracking.failures import run_failure, store_errors
    from imgclf.tracking.store import configure

    configure()
    client = mlflow.tracking.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise run_failure(run_id, exc, "check the id in `mlflow ui`") from None
    with store_errors("rerun `imgclf promote`"):
        name = model_name(run, name)
        reason = check_not_worse(run, current_holder(client, name, alias), alias, force)
        version = version_of(client, name, run)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for key, value in {"promoted_alias": alias, "promoted_by": f"{getpass.getuser()}@{socket.gethostname()}",
                           "promoted_at": stamp, "promote_reason": reason, SCORE: f"{score(run):.6f}",
                           "data_digest": run.data.tags.get("data_digest", "")}.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, alias, version)
    uri = f"models:/{name}@{alias}"
    print(f"{uri} -> version {version} (MLflow run {run_id}): {reason}")
    return uri
