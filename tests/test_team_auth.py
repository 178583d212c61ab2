"""The team server lets in only the team (docs/team.md#who-may-do-what): `imgclf-team serve` behind MLflow's
basic-auth app on a real PostgreSQL, its admin, `imgclf-team user add` members READ or EDIT, and the pipeline's
check naming a missing, wrong or insufficient credential in one line before it trains. All on 127.0.0.1."""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import BIN, error_line, finished_runs, pipeline_env, run
from imgclf.config import load_params
from test_team import TeamServer, login, one_error_line

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("team-auth")]


@pytest.fixture(scope="module")
def server():
    """A team server with one run of the admin's in experiment `shared`; this process logs in as the admin."""
    team = TeamServer()
    try:
        team.start()
        with pytest.MonkeyPatch.context() as patch:
            login(patch, *team.auth)
            client = MlflowClient(team.uri)
            experiment = client.create_experiment("shared")
            team.run_id = client.create_run(experiment).info.run_id
            client.log_metric(team.run_id, "dev_loss", 0.125)
            client.log_text(team.run_id, "the admin's notes", "notes.txt")
            client.set_terminated(team.run_id)
            yield team
    finally:
        team.cleanup()


def add_member(server: TeamServer, name: str, *flags: str) -> str:
    """`imgclf-team user add NAME` as the admin types it on the server's machine; the member's password."""
    added = run([str(BIN / "imgclf-team"), "user", "add", name, *flags, "--dir", str(server.root / "data"),
                 "--to", server.uri], server.root, pipeline_env())
    password_file = server.root / "data/members" / f"{name}.password"
    password = password_file.read_text()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert str(password_file) in added.stdout and password not in added.stdout + added.stderr
    return password


@pytest.fixture(scope="module")
def reader(server) -> str:
    return add_member(server, "reader", "--read-only")


@pytest.fixture(scope="module")
def editor(server) -> str:
    return add_member(server, "editor")


@pytest.mark.parametrize("auth", [None, ("admin", "not-the-password"), ("nobody", "some-password-here")])
@pytest.mark.parametrize("path", ["/api/2.0/mlflow/experiments/search?max_results=10", "/api/2.0/mlflow/runs/get",
                                  "/ajax-api/2.0/mlflow/runs/search", "/"])
def test_a_request_without_valid_credentials_gets_one_line_and_no_data(server, path, auth):
    url = f"{server.uri}{path}" + (f"?run_id={server.run_id}" if path.endswith("runs/get") else "")
    post = path.startswith("/ajax-api")  # the UI's search: a POST of the experiments to list

    def ask(credentials):
        if post:
            return requests.post(url, auth=credentials, json={"experiment_ids": ["1"]}, timeout=10)
        return requests.get(url, auth=credentials, timeout=10)

    answer = ask(auth)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == 'Basic realm="mlflow"'
    assert len(answer.text.strip().splitlines()) == 1 and "dev_loss" not in answer.text
    assert server.run_id not in answer.text and "shared" not in answer.text
    admins = ask(server.auth)  # the same door opens for the admin, with the data
    assert admins.status_code == 200
    assert path == "/" or server.run_id in admins.text or "shared" in admins.text, admins.text[:300]


def test_the_admins_password_is_private_and_never_logged(server):
    secret = server.root / "data/admin.password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = server.auth[1]
    assert len(password) >= 12
    logs = [server.root / "serve.out", server.root / "data/mlflow.log", server.root / "data/basic_auth.ini"]
    assert all(password not in path.read_text() for path in logs)
    assert "default_permission = NO_PERMISSIONS" in (server.root / "data/basic_auth.ini").read_text()


def test_a_read_only_member_reads_but_cannot_delete_or_change_a_run(server, reader, monkeypatch, tmp_path):
    login(monkeypatch, "reader", reader)
    client = MlflowClient(server.uri)
    assert client.get_run(server.run_id).data.metrics == {"dev_loss": 0.125}
    assert Path(client.download_artifacts(server.run_id, "notes.txt", str(tmp_path))).read_text() == \
        "the admin's notes"
    for change in (lambda: client.delete_run(server.run_id),
                   lambda: client.log_metric(server.run_id, "dev_loss", 9.0),
                   lambda: client.set_tag(server.run_id, "note", "changed")):
        with pytest.raises(MlflowException, match="error code 403"):
            change()
    login(monkeypatch, *server.auth)
    kept = client.get_run(server.run_id)
    assert kept.info.lifecycle_stage == "active" and kept.data.metrics == {"dev_loss": 0.125}
    assert "note" not in kept.data.tags


def test_an_edit_member_logs_a_run_in_the_teams_experiment_but_cannot_delete_others_runs(server, editor,
                                                                                        monkeypatch):
    login(monkeypatch, "editor", editor)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("shared").experiment_id
    run_id = client.create_run(experiment).info.run_id
    client.log_param(run_id, "seed", "51")
    client.log_metric(run_id, "dev_loss", 0.25, step=1)
    client.set_terminated(run_id)
    with pytest.raises(MlflowException, match="error code 403"):
        client.delete_run(server.run_id)  # deleting is MANAGE: the admin's, or a member's on their own
    login(monkeypatch, *server.auth)
    logged = client.get_run(run_id)
    assert (logged.data.params, logged.data.metrics, logged.info.status) == ({"seed": "51"}, {"dev_loss": 0.25},
                                                                            "FINISHED")


def test_user_add_refuses_a_bad_or_taken_name_in_one_line(server, editor):
    base = [str(BIN / "imgclf-team"), "user", "add"]
    where = ["--dir", str(server.root / "data"), "--to", server.uri]
    for name, said in (("../x", "member name '../x': use 1-64 letters"), ("admin", "and not 'admin'"),
                       ("editor", "editor.password exists: member editor was added before")):
        line = one_error_line(run([*base, name, *where], server.root, pipeline_env(), check=False), "user")
        assert said in line, line
    assert not (server.root / "x.password").exists() and not (server.root / "data/x.password").exists()
    elsewhere = server.root / "not-the-team-dir"
    line = one_error_line(run([*base, "carol", "--dir", str(elsewhere), "--to", server.uri], server.root,
                              pipeline_env(), check=False), "user")
    assert f"no {elsewhere / 'admin.password'}: pass the --dir the team server runs with" in line
    elsewhere.mkdir()
    (elsewhere / "admin.password").write_text("another-servers-password")
    line = one_error_line(run([*base, "carol", "--dir", str(elsewhere), "--to", server.uri], server.root,
                              pipeline_env(), check=False), "user")
    assert f"{server.uri} refuses the admin's password in {elsewhere / 'admin.password'}" in line
    assert not (elsewhere / "members/carol.password").exists()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("who", ["nobody", "wrong password", "read-only member"])
def test_the_pipeline_names_a_missing_wrong_or_read_only_credential_in_one_line_before_training(
        server, reader, trained_copy, who, monkeypatch):
    experiment = load_params(str(trained_copy / "params.yaml"), [])["tracking"]["experiment"]
    login(monkeypatch, *server.auth)
    client = MlflowClient(server.uri)
    if client.get_experiment_by_name(experiment) is None:  # the team's: a reader could create a new one
        client.create_experiment(experiment)
    credentials = {"nobody": {}, "wrong password": {"MLFLOW_TRACKING_USERNAME": "reader",
                                                    "MLFLOW_TRACKING_PASSWORD": "wrong-password-123"},
                   "read-only member": {"MLFLOW_TRACKING_USERNAME": "reader",
                                        "MLFLOW_TRACKING_PASSWORD": reader}}[who]
    model = trained_copy / "models/model.keras"
    before = sha256(model)
    failed = run(["imgclf", "train"], trained_copy, pipeline_env(MLFLOW_TRACKING_URI=server.uri, **credentials),
                 check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    line = error_line(failed.stderr, "train")
    status, fix = {"nobody": ("401 Unauthorized", "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
                   "wrong password": ("401 Unauthorized", "user reader or its password is not accepted"),
                   "read-only member": ("403 Forbidden", "user reader may not do this")}[who]
    assert line.startswith(f"imgclf train: error: MLflow tracking server {server.uri}: {status}: {fix}"), line
    assert line.endswith("(a team admin makes members: imgclf-team user add NAME)"), line
    if status.startswith("401"):
        assert "Training " not in failed.stdout, failed.stdout  # refused before the model was even built
    assert not re.search(r"^Epoch \d", failed.stdout, re.M) and sha256(model) == before
    assert finished_runs(server.uri, experiment) == []
