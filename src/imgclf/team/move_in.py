"""`imgclf-team move-in`: copy the runs of a local MLflow store (a clone's mlflow.db) into the team's server.

MLflow has no command that moves runs between stores, and a database dump does not fit: the sqlite file and
the PostgreSQL database differ in dialect, and the artifacts live beside the file, outside it. So the copy goes
through MLflow's client, run by run: experiment (by name), run name, start and end time, status, params, every
point of every metric with its step and timestamp, tags, dataset inputs, the run's artifacts and its logged
models (whose artifacts `runs:/ID/model` resolves to), uploaded through the server.

What changes: run ids (the server assigns them; each copy is tagged `moved_from` = the old id, which also lets a
second move-in skip runs already moved) and model-registry versions (not copied: register again from the new
run). Runs still RUNNING are skipped: they may be training right now.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

from imgclf.errors import ImgclfError

MOVED_FROM = "moved_from"
PARENT_TAG = "mlflow.parentRunId"


def all_runs(client, experiment_id: str) -> Iterator:
    """Every active run of an experiment, page by page."""
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def logged_models_by_run(client, experiment_id: str) -> dict[str, list]:
    """{source run id: its logged models} of an experiment."""
    by_run: dict[str, list] = {}
    token = None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        for model in page:
            by_run.setdefault(model.source_run_id, []).append(model)
        token = page.token
        if not token:
            return by_run


def target_experiment(dst, experiment) -> str:
    """The team server's experiment of the same name (created with the same tags when missing)."""
    found = dst.get_experiment_by_name(experiment.name)
    if found is not None:
        return found.experiment_id
    tags = {k: v for k, v in experiment.tags.items() if not k.startswith("mlflow.")}
    return dst.create_experiment(experiment.name, tags=tags)  # the server's artifact store, not the local path


def copy_artifacts(src, dst, old_id: str, new_id: str) -> None:
    """The run's own artifacts (params.yaml, reports, manifest), uploaded through the server."""
    if not src.list_artifacts(old_id):
        return
    with tempfile.TemporaryDirectory(prefix="imgclf-move-in-") as tmp:
        dst.log_artifacts(new_id, src.download_artifacts(old_id, "", tmp))


def copy_models(dst, models: list, experiment_id: str, new_id: str, source_uri: str) -> None:
    """Each logged model of the run: a new logged model of the new run, with the same files, params and tags."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    outputs = []
    for model in models:
        tags = {k: v for k, v in model.tags.items() if not k.startswith("mlflow.")}
        new = dst.create_logged_model(experiment_id, name=model.name, source_run_id=new_id, tags=tags,
                                      params=model.params, model_type=model.model_type)
        with tempfile.TemporaryDirectory(prefix="imgclf-move-in-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp,
                                                        tracking_uri=source_uri)
            dst.log_model_artifacts(new.model_id, local)
        dst.finalize_logged_model(new.model_id, LoggedModelStatus.READY)
        outputs.append(LoggedModelOutput(new.model_id, step=0))
    if outputs:
        dst.log_outputs(new_id, outputs)


def copy_run(src, dst, run, experiment_id: str, models: list, source_uri: str) -> str:
    """One run into `experiment_id` of the server; returns the new run id."""
    from mlflow.entities import Metric, Param

    old_id = run.info.run_id
    tags = {**run.data.tags, MOVED_FROM: old_id}
    new_id = dst.create_run(experiment_id, start_time=run.info.start_time, tags=tags,
                            run_name=run.info.run_name).info.run_id
    # Only key, value, timestamp and step: a point's model id names a logged model of the old store.
    metrics = [Metric(p.key, p.value, p.timestamp, p.step) for key in run.data.metrics
               for p in src.get_metric_history(old_id, key)]
    dst.log_batch(new_id, metrics=metrics, params=[Param(k, v) for k, v in run.data.params.items()])
    if run.inputs and run.inputs.dataset_inputs:
        dst.log_inputs(new_id, datasets=list(run.inputs.dataset_inputs))
    copy_artifacts(src, dst, old_id, new_id)
    copy_models(dst, models, experiment_id, new_id, source_uri)
    dst.set_terminated(new_id, run.info.status, end_time=run.info.end_time)
    return new_id


def move_experiment(src, dst, experiment, source_uri: str) -> tuple[dict[str, str], int]:
    """Copy the runs of one experiment not moved before: ({old id: new id}, runs already there)."""
    target = target_experiment(dst, experiment)
    there = {r.data.tags.get(MOVED_FROM) for r in all_runs(dst, target)}
    models = logged_models_by_run(src, experiment.experiment_id)
    moved: dict[str, str] = {}
    skipped = 0
    for run in all_runs(src, experiment.experiment_id):
        if run.info.run_id in there:
            skipped += 1
        elif run.info.status == "RUNNING":
            print(f"skipped run {run.info.run_id} ({run.info.run_name}): still RUNNING; move it in once it ended")
        else:
            old_id = run.info.run_id
            moved[old_id] = copy_run(src, dst, run, target, models.get(old_id, []), source_uri)
            print(f"moved run {old_id} ({run.info.run_name}) of {experiment.name!r} -> {moved[old_id]}")
    for old_id, new_id in moved.items():  # nested runs: point children at their parent's copy
        parent = src.get_run(old_id).data.tags.get(PARENT_TAG)
        if parent in moved:
            dst.set_tag(new_id, PARENT_TAG, moved[parent])
    return moved, skipped


def check_source(uri: str) -> None:
    """Refuse a sqlite path that does not exist: MLflow would silently create an empty store there."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ImgclfError(f"{path}: no MLflow store there; pass the clone's store with --from sqlite:///PATH")


def main(source: str, target: str | None, experiments: list[str]) -> int:
    """Copy every experiment (or the named ones) of `source` into `target`; print old -> new run ids."""
    if not target:
        raise ImgclfError("no team server given; export MLFLOW_TRACKING_URI=http://HOST:PORT or pass --to")
    if source == target:
        raise ImgclfError(f"--from and --to are the same store ({source}); pass the local store with --from")
    check_source(source)
    from mlflow.tracking import MlflowClient

    from imgclf.tracking.failures import store_errors
    from imgclf.tracking.store import configure

    os.environ["MLFLOW_TRACKING_URI"] = target
    configure()  # bounded HTTP retries; one line when the server does not answer
    src, dst = MlflowClient(source), MlflowClient(target)
    then = "run `imgclf-team move-in` again: runs already moved are skipped"
    with store_errors(then):
        chosen = [e for e in src.search_experiments() if not experiments or e.name in experiments]
        missing = sorted(set(experiments) - {e.name for e in chosen})
        if missing:
            raise ImgclfError(f"no experiment {', '.join(missing)} in {source}; leave out --experiment to move all")
        moved, skipped = {}, 0
        for experiment in chosen:
            pairs, already = move_experiment(src, dst, experiment, source)
            moved, skipped = moved | pairs, skipped + already
    print(f"moved {len(moved)} run(s) into {target} ({skipped} moved before, skipped); the copies are tagged "
          f"{MOVED_FROM} with their old run id")
    return 0
