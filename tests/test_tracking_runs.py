"""Which MLflow run `train` logs into and how it is named and tagged (imgclf.tracking.tracker), on a real sqlite store."""

from __future__ import annotations

import copy
import os
import random
import socket
import subprocess
import sys
import time

import keras
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, pipeline_env, run, store_in
from imgclf.config import apply_overrides
from imgclf.tracking.tracker import Tracker

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
MANIFEST = {"digest": "d" * 64, "dataset": "digits", "source": {"path": None}}


@pytest.fixture
def client(tmp_path, monkeypatch, empty_store) -> MlflowClient:
    """The default store (sqlite under the working directory), outside DVC and `mlflow run`."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return MlflowClient(store_in(tmp_path, empty_store))


def params(*overrides: str) -> dict:
    return apply_overrides(copy.deepcopy(PARAMS), list(overrides))


def start(p: dict, resume_run_id: str | None = None, interrupt: bool = False) -> str:
    """Open (and end) train's run the way train() does, after seeding `random` as train does; its id.

    interrupt=True ends it like a Ctrl-C / SIGTERM, leaving a checkpoint that names it."""
    random.seed(p["seed"])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    try:
        with Tracker.connect(p["tracking"]).training_run(p, MANIFEST, model, "CPU: test", resume_run_id) as handle:
            if interrupt:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    return handle.run_id


def dead_pid() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return str(proc.pid)


def test_resume_after_non_identity_params_changed_continues_in_a_new_run(client, capsys):
    old = start(params(), interrupt=True)
    client.update_run(old, status="RUNNING")  # as a kill -9 leaves it
    client.set_tag(old, "pid", dead_pid())
    changed = params("data.path=/tmp/elsewhere", "evaluate.tta=flip", "tracking.experiment=other")
    new = start(changed, resume_run_id=old)
    assert new != old
    assert "data.path, evaluate.tta, tracking.experiment differ from MLflow run" in capsys.readouterr().out
    before = client.get_run(old)
    assert before.data.params["evaluate.tta"] == "none"  # the old run's params are untouched ...
    assert before.info.status == "KILLED"  # ... and it no longer looks alive, although in another experiment
    after = client.get_run(new)
    assert after.data.params["evaluate.tta"] == "flip" and after.data.params["data.path"] == "/tmp/elsewhere"
    assert after.data.tags["resumed_from"] == old and after.info.status == "FINISHED"


def test_resume_with_the_same_params_reopens_the_run_and_logs_keys_added_since(client):
    older = params()
    del older["train"]["stop_on_collapse"]  # a run logged before the key existed
    old = start(older, interrupt=True)
    assert start(params(), resume_run_id=old) == old
    assert client.get_run(old).data.params["train.stop_on_collapse"] == "True"


def test_a_queued_experiment_records_its_baseline_commit_not_the_workspace_head(client, tmp_path, monkeypatch,
                                                                                empty_store):
    workspace, experiment = tmp_path / "workspace", tmp_path / "experiment"
    workspace.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "baseline"]):
        run(cmd, workspace, pipeline_env())
    baseline = run(["git", "rev-parse", "HEAD"], workspace).stdout.strip()
    run(["git", "clone", "-q", str(workspace), str(experiment)], tmp_path)  # DVC's copy, at the baseline
    (workspace / "code.py").write_text("later\n")
    for cmd in (["git", "add", "code.py"], ["git", "commit", "-qm", "later"]):  # the workspace moved on ...
        run(cmd, workspace, pipeline_env())
    (workspace / "code.py").write_text("edited\n")  # ... and is dirty
    monkeypatch.chdir(experiment)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    tags = MlflowClient(store_in(workspace, empty_store)).get_run(start(params())).data.tags
    assert (tags["git_commit"], tags["git_dirty"]) == (baseline, "False")
    assert tags["dvc_exp_baseline_rev"] == baseline


def test_default_run_names_say_what_they_are_and_differ_under_one_seed(client, monkeypatch):
    first, second = (client.get_run(start(params())).info.run_name for _ in range(2))
    assert first.startswith("report-digits-seed51-") and second.startswith("report-digits-seed51-")
    assert first != second  # MLflow's own names come from `random`, which train has just seeded
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-lake")
    assert client.get_run(start(params())).info.run_name == "sunny-lake"


def test_runs_left_running_by_a_dead_process_are_ended_killed(client):
    dead = dead_pid()
    start(params())  # creates the experiment
    exp = client.get_experiment_by_name(PARAMS["tracking"]["experiment"]).experiment_id
    here = client.get_run(start(params())).data.tags
    assert here["host"] == socket.gethostname() and int(here["pid"]) > 0
    owner = {k: here[k] for k in ("host", "pid_namespace")}

    def running(**tags) -> str:
        return client.create_run(exp, tags={**owner, **tags}).info.run_id

    orphan = running(pid=dead)
    alive = running(pid=str(os.getpid()))  # e.g. a queued experiment training beside us
    elsewhere = running(pid=dead, host="another-machine")
    untagged = client.create_run(exp).info.run_id  # not ours to judge: no process recorded
    start(params())
    status = {r: client.get_run(r).info.status for r in (orphan, alive, elsewhere, untagged)}
    assert status == {orphan: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}


def test_system_metrics_are_sampled_only_when_asked(client, monkeypatch):
    """tracking.system_metrics: MLflow's own sampler logs `system/*` metrics while the training run is open."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    ids = {}
    for asked in (False, True):
        p = params(f"tracking.system_metrics={str(asked).lower()}")
        with Tracker.connect(p["tracking"]).training_run(p, MANIFEST, model, "CPU: test") as handle:
            time.sleep(1.5)
        ids[asked] = handle.run_id
    assert not any(k.startswith("system/") for k in client.get_run(ids[False]).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        client.get_run(ids[True]).data.metrics)


def test_the_early_stop_outcome_is_logged_as_metrics_not_params_and_read_back_from_old_runs(client, tmp_path):
    from imgclf.tracking.keys import outcome

    p = params()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    for name in ("history.csv", "loss.png"):
        (tmp_path / name).write_text("x")
    summary = {"early_stopped": False, "stopped_epoch": 0, "best_epoch": 4, "best_loss": 2.5, "epochs_run": 6,
               "stop_reason": "training_epochs", "monitor": "loss", "patience": 5, "weights_sha256": "a" * 64,
               "collapsed": False, "collapsed_epoch": 0, "train_seconds": 1.0}
    with Tracker.connect(p["tracking"]).training_run(p, MANIFEST, model, "CPU: test") as handle:
        handle.log_training_end(summary, model, tmp_path, lambda model, register_as: None)
    r = client.get_run(handle.run_id)
    assert {k: r.data.metrics[k] for k in ("early_stopped", "stopped_epoch", "best_epoch", "best_loss")} == {
        "early_stopped": 0.0, "stopped_epoch": 0.0, "best_epoch": 4.0, "best_loss": 2.5}
    assert [m.step for m in client.get_metric_history(r.info.run_id, "best_loss")] == [6]  # the last epoch's
    assert not {"early_stopped", "stopped_epoch", "best_epoch", "best_loss", "stop_reason"} & set(r.data.params)
    assert r.data.tags["stop_reason"] == "training_epochs" and r.data.tags["early_stopped"] == "False"
    assert outcome(r, "best_epoch") == 4.0
    # A run logged before #43: the outcome as params (and tags)
    old = client.create_run(r.info.experiment_id).info.run_id
    client.log_param(old, "early_stopped", "True")
    client.log_param(old, "best_loss", "7.0")
    client.set_tag(old, "stopped_epoch", "8")
    old_run = client.get_run(old)
    assert (outcome(old_run, "early_stopped"), outcome(old_run, "best_loss"), outcome(old_run, "stopped_epoch")) == (
        1.0, 7.0, 8.0)
    assert outcome(old_run, "best_epoch") is None


def test_scores_are_logged_under_sectioned_keys_and_read_back_under_either_name(client):
    """#43: the run page opens on the dev curves and the training loss because their keys carry a section (the
    split); readers take runs logged before that with the flat names."""
    from imgclf.metrics import EPOCH_METRICS
    from imgclf.tracking.keys import metric_history, metric_key, run_metric
    from imgclf.tracking.runs import EvaluationRun, log_epoch

    assert [metric_key(k) for k in EPOCH_METRICS] == [
        "train/loss", "train/loss_sum", "train/accuracy", "dev/loss", "dev/accuracy", "dev/f1_macro",
        "early_stopping_wait", "epoch_seconds"]
    assert [metric_key(k) for k in ("test_f1_macro", "test_accuracy", "best_loss", "dev", "development_x")] == [
        "test/f1_macro", "test/accuracy", "best_loss", "dev", "development_x"]
    import mlflow

    from imgclf.tracking.store import configure

    configure()  # the fluent API at the client's store (the working directory's), as the pipeline points it
    experiment = client.create_experiment("keys")
    new = client.create_run(experiment).info.run_id
    with mlflow.start_run(run_id=new):
        for epoch in (1, 2):
            log_epoch({k: float(epoch) for k in EPOCH_METRICS}, epoch)
        EvaluationRun(new).log_final({"dev_f1_macro": 0.75, "test_accuracy": 0.5}, 2, [], {})
    run = client.get_run(new)
    sections = {k.rpartition("/")[0] for k in run.data.metrics}
    assert sections == {"", "train", "dev", "test"}, sections
    assert not {"loss", "dev_f1_macro", "test_accuracy"} & set(run.data.metrics)
    old = client.create_run(experiment).info.run_id  # as logged before #43
    for step, value in ((1, 3.0), (2, 2.0)):
        client.log_metric(old, "loss", value, step=step)
    client.log_metric(old, "dev_f1_macro", 0.5, step=2)
    old_run = client.get_run(old)
    assert (run_metric(run, "dev_f1_macro"), run_metric(old_run, "dev_f1_macro")) == (0.75, 0.5)
    assert run_metric(run, "test_accuracy") == 0.5 and run_metric(old_run, "test_accuracy") is None
    assert sorted((m.step, m.value) for m in metric_history(client, new, "loss")) == [(1, 1.0), (2, 2.0)]
    assert sorted((m.step, m.value) for m in metric_history(client, old, "loss")) == [(1, 3.0), (2, 2.0)]
    assert metric_history(client, old, "epoch_seconds") == []
