"""Crashes and failing neighbours: kill -9 inside `dvc repro`, a tracking server dying mid-training. Real DVC,
MLflow and TensorFlow processes only. (Queued experiments sharing the default sqlite store, and a queue worker
killed mid-run: tests/test_experiments.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)

from conftest import ALWAYS_RUN, TINY, UNTIL_INTERRUPTED, MlflowServer, dvc_status, error_line, finished_runs, pipeline_env
from conftest import run, set_args
from conftest import wait_for_metric, wait_until, write_params

pytestmark = pytest.mark.e2e


@pytest.mark.long(51)
def test_kill_9_during_train_is_not_cached_as_done_and_repro_resumes(repo_copy):
    write_params(repo_copy, TINY | {"train.training_epochs": "12"})
    state = repo_copy / "models/checkpoint/state.json"
    # Its own process group, so kill -9 takes DVC and the stage it runs at once, like a crash or the OOM killer.
    repro = subprocess.Popen(["dvc", "repro"], cwd=repo_copy, env=pipeline_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: state.exists() or repro.poll() is not None, 180, "the first checkpoint", interval=0.05)
    finally:
        os.killpg(repro.pid, signal.SIGKILL)
        repro.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 1 <= killed_at < 12

    status = dvc_status(repo_copy)
    assert set(status) == {*ALWAYS_RUN, "train", "evaluate"}  # prepare had finished and stays done
    assert "train" not in yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]
    assert not (repo_copy / "models/model.keras").exists()

    again = run(["dvc", "repro"], repo_copy)
    assert f"Resuming after epoch {killed_at}" in again.stdout
    assert dvc_status(repo_copy) == ALWAYS_RUN
    runs = finished_runs(f"sqlite:///{repo_copy / 'mlflow.db'}", "imgclf")
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed run, resumed and finished: no stray run


def test_http_retries_are_bounded_unless_the_user_chose(mlflow_server, monkeypatch):
    from imgclf.tracking import store as tracking

    for variable in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR):
        monkeypatch.setenv(variable.name, "")  # recorded, so the teardown restores the session's environment
        monkeypatch.delenv(variable.name)
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_TIMEOUT.name, "7")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert tracking.configure() == (mlflow_server, False)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7


def test_tracking_server_dying_mid_training_fails_fast_in_one_line(prepared_copy, tmp_path):
    repo_copy = prepared_copy  # as after `imgclf prepare` with TINY
    server = MlflowServer(tmp_path / "server")
    try:
        env = pipeline_env(MLFLOW_TRACKING_URI=server.uri)
        cmd = ["imgclf", *set_args(UNTIL_INTERRUPTED), "train"]
        train = subprocess.Popen(cmd, cwd=repo_copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        try:
            run_id = wait_for_metric(server.uri, "imgclf", "train/loss").info.run_id
            server.kill()
            killed = time.monotonic()
            _, stderr = train.communicate(timeout=180)
            seconds = time.monotonic() - killed
        finally:
            train.kill()
    finally:
        server.kill()

    line = error_line(stderr, "train")
    assert train.returncode == 2 and stderr.strip().endswith(line) and "Traceback" not in stderr
    assert line.startswith(f"imgclf train: error: MLflow tracking server {server.uri} stopped answering (")
    assert "gave up after 3 retries" in line and line.endswith("then rerun: training resumes from its last checkpoint")
    print(f"train gave up {seconds:.1f} s after the server died")  # shown by `pytest -rP`
    assert seconds < 30, f"took {seconds:.1f} s to give up"  # 4 tries with 0 + 2 + 4 s backoff (+ jitter)
    # Local outputs stay consistent: no model written as if good, a resumable checkpoint of this run.
    assert not (repo_copy / "models/model.keras").exists() and not (repo_copy / "reports/train.json").exists()
    state = json.loads((repo_copy / "models/checkpoint/state.json").read_text())
    assert state["epoch"] >= 1 and state["mlflow_run_id"] == run_id
    assert (repo_copy / "models/checkpoint" / state["weights"]).is_file()
