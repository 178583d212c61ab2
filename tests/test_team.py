"""Team mode end to end (docs/team.md): `imgclf-team serve` (real PostgreSQL + a real `mlflow server`), the pipeline
against it through MLFLOW_TRACKING_URI, moving a clone's runs in, and a DVC remote over a real sshd, all on
127.0.0.1. One server and one repo copy serve the whole module; tiny settings."""

from __future__ import annotations

import getpass
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import ALWAYS_RUN, BIN, copy_trained, dvc_status, finished_runs, free_port, pipeline_env, reaped, run
from conftest import stages_run, wait_until
from imgclf.config import load_params
from imgclf.metrics import EPOCH_METRICS
from imgclf.tracking.keys import metric_key
from imgclf.tracking.tracker import Tracker
from test_dvc_remote import cached_files

# One worker runs the whole module: its server, sshd and repo are built once and shared by its tests.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("team")]
SSHD = "/usr/sbin/sshd"
FINAL_TOO = ("dev/f1_macro", "dev/accuracy")  # evaluate logs the final score at the last epoch's step as well


class TeamServer:
    """`imgclf-team serve` as a user starts it, in a folder the postgres user can reach (not pytest's 0700 one)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="imgclf-team-test-"))
        self.root.chmod(0o755)
        self.port, self.proc, self.output = free_port(), None, self.root / "serve.out"

    def start(self) -> str:
        """Start it and return the MLFLOW_TRACKING_URI it prints."""
        offset = self.output.stat().st_size if self.output.exists() else 0
        with open(self.output, "a") as out:
            self.proc = subprocess.Popen([str(BIN / "imgclf-team"), "serve", "--dir", str(self.root / "data"),
                                          "--port", str(self.port), "--workers", "2"], stdout=out,
                                         stderr=subprocess.STDOUT, env=pipeline_env(), start_new_session=True)
        self.uri = wait_until(lambda: self._printed_uri(offset), 300, "imgclf-team serve to print its URI", 0.5)
        return self.uri

    def _printed_uri(self, offset: int) -> str | None:
        text = self.text(offset)
        if self.proc.poll() is not None:
            pytest.fail(f"imgclf-team serve exited {self.proc.returncode}:\n{text[-3000:]}")
        found = re.search(r"^export MLFLOW_TRACKING_URI=(\S+)$", text, re.M)
        return found.group(1) if found else None

    def text(self, offset: int = 0) -> str:
        return self.output.read_text()[offset:]

    @property
    def auth(self) -> tuple[str, str]:
        """The admin's user name and password: `imgclf-team serve` writes the password on first start."""
        return "admin", (self.root / "data/admin.password").read_text().strip()

    def env(self, **extra: str) -> dict[str, str]:
        """A team member's shell: the server's URI and the admin's credentials (MLflow's basic auth is on)."""
        user, password = self.auth
        return pipeline_env(MLFLOW_TRACKING_URI=self.uri, MLFLOW_TRACKING_USERNAME=user,
                            MLFLOW_TRACKING_PASSWORD=password, **extra)

    def log_tail(self, lines: int = 80) -> str:
        """The end of the MLflow server's own log (requests and their status, tracebacks of the ones that failed)."""
        try:
            return "\n".join((self.root / "data/mlflow.log").read_text().splitlines()[-lines:])
        except OSError as exc:
            return f"(no MLflow server log: {exc})"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal `imgclf-team serve` (only it: it stops its children itself) and return its exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=90)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.root / "data/postgres/postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cleanup(self) -> None:
        """Whatever a failed test left: the server's group, a PostgreSQL left behind, the folder."""
        if self.proc and self.proc.poll() is None:
            self.stop()
        pid = self.postmaster_pid()
        if pid and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGQUIT)
        shutil.rmtree(self.root, ignore_errors=True)


def login(patch: pytest.MonkeyPatch, user: str, password: str) -> None:
    """This process's MLflow client acts as `user` (MLflow reads the variables at every request)."""
    patch.setenv("MLFLOW_TRACKING_USERNAME", user)
    patch.setenv("MLFLOW_TRACKING_PASSWORD", password)


@pytest.fixture(scope="module")
def team():
    """The module's team server; this process's MLflow clients log in as its admin."""
    server = TeamServer()
    try:
        server.start()
        with pytest.MonkeyPatch.context() as patch:
            login(patch, *server.auth)
            yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, trained):
    """A copy of the session's tiny run (conftest.trained): tiny params.yaml and its outputs committed."""
    with reaped(copy_trained(trained, tmp_path_factory.mktemp("team") / "repo")) as path:
        yield path


@pytest.fixture(scope="module")
def local_run(repo) -> str:
    """The clone's pipeline run with no team server: the one run in its own ./mlflow.db."""
    [only] = finished_runs(f"sqlite:///{repo / 'mlflow.db'}", "imgclf")
    return only.info.run_id


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one `imgclf-team COMMAND: error: ...` line of a failed command (TensorFlow's start-up chatter aside)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith(f"imgclf-team {command}: error: ")]
    return line


@pytest.mark.parametrize("taken", ["port", "folder"])
def test_serve_names_a_taken_port_or_folder_in_one_line(team, tmp_path, taken):
    other = tmp_path / "other"
    args = ["--dir", str(other), "--port", str(team.port)] if taken == "port" else \
        ["--dir", str(team.root / "data"), "--port", str(free_port())]
    line = one_error_line(run([str(BIN / "imgclf-team"), "serve", *args], tmp_path, check=False), "serve")
    if taken == "port":
        assert f"cannot listen on 127.0.0.1:{team.port}" in line and "pick another --port" in line
        assert not other.exists()
    else:
        assert f"PostgreSQL pid {team.postmaster_pid()} still runs on {team.root / 'data/postgres'}" in line


def test_move_in_names_a_missing_store_and_an_unreachable_server_in_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    teamless = pipeline_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    line = one_error_line(run([str(BIN / "imgclf-team"), "move-in", "--from", f"sqlite:///{missing}"], tmp_path,
                              teamless, check=False), "move-in")
    assert line.endswith(f"{missing}: no MLflow store there; pass the clone's store with --from sqlite:///PATH")
    assert not missing.parent.exists()  # MLflow would have created an empty store there
    (tmp_path / "mlflow.db").touch()
    line = one_error_line(run([str(BIN / "imgclf-team"), "move-in"], tmp_path, teamless, check=False), "move-in")
    assert "is unreachable" in line and teamless["MLFLOW_TRACKING_URI"] in line


def metric_history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def predicted(repo: Path, image: Path, *source: str, env: dict) -> str:
    """`imgclf predict`'s line for one image."""
    return run(["imgclf", "predict", *source, str(image)], repo, env).stdout.strip().splitlines()[-1]


def test_move_in_copies_a_clones_runs_which_predict_and_rerun_then_use(team, repo, local_run):
    env = team.env()
    moved = run([str(BIN / "imgclf-team"), "move-in", "--from", f"sqlite:///{repo / 'mlflow.db'}"], repo, env)
    new_id = re.search(rf"moved run {local_run} \(.*\) of 'imgclf' -> (\w+)", moved.stdout).group(1)
    src, dst = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}"), MlflowClient(team.uri)
    old, new = src.get_run(local_run), dst.get_run(new_id)
    assert new.data.params == old.data.params and new.data.tags == {**old.data.tags, "moved_from": local_run}
    assert metric_history(dst, new_id) == metric_history(src, local_run)
    assert (new.info.status, new.info.start_time, new.info.end_time, new.info.run_name) == \
        (old.info.status, old.info.start_time, old.info.end_time, old.info.run_name)
    assert {a.path for a in dst.list_artifacts(new_id)} == {a.path for a in src.list_artifacts(local_run)}
    digests = [[i.dataset.digest for i in r.inputs.dataset_inputs] for r in (new, old)]
    assert digests[0] == digests[1] and digests[0]
    again = run([str(BIN / "imgclf-team"), "move-in", "--from", f"sqlite:///{repo / 'mlflow.db'}"], repo, env)
    assert "moved 0 run(s)" in again.stdout and "(1 moved before, skipped)" in again.stdout

    image = repo / "digit.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    assert predicted(repo, image, "--run", new_id, env=env) == predicted(repo, image, "--model",
                                                                         "models/model.keras", env=env)
    rerun = run(["imgclf", "rerun", new_id], repo, env)
    assert f"MATCH: weights sha256 {old.data.tags['weights_sha256']}" in rerun.stdout
    [copy] = [r for r in finished_runs(team.uri, "imgclf") if r.data.tags.get("rerun_of") == new_id]
    assert copy.data.tags["reproduced"] == "true"


def test_two_queued_experiments_log_each_epoch_once_and_register_on_the_server(team, repo):
    env = team.env()
    run(["imgclf", "experiments", "--variants", "report_final", "--seeds", "52", "53", "--jobs", "2",
         "-S", "tracking.experiment=team-queue", "-S", "tracking.register_model=teamnet"], repo, env, timeout=900)
    runs = finished_runs(team.uri, "team-queue")
    assert sorted(int(r.data.params["seed"]) for r in runs) == [52, 53]
    assert runs[1].info.start_time < runs[0].info.end_time, "the two experiments did not overlap"
    client = MlflowClient(team.uri)
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["evaluated"] == "true"
        epochs = list(range(1, int(r.data.metrics["epochs_run"]) + 1))
        history = metric_history(client, r.info.run_id)
        for key in map(metric_key, EPOCH_METRICS):
            steps = [step for step, _ in history[key]]
            assert steps == epochs + ([epochs[-1]] if key in FINAL_TOO else []), (key, steps)
    versions = client.search_model_versions("name = 'teamnet'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)

    # What `mlflow ui` asks for: its page, and the runs of the experiment through its ajax API.
    assert "<title>MLflow</title>" in requests.get(team.uri, auth=team.auth, timeout=10).text
    exp_id = runs[0].info.experiment_id
    listed = requests.post(f"{team.uri}/ajax-api/2.0/mlflow/runs/search", json={"experiment_ids": [exp_id]},
                           auth=team.auth, timeout=10).json()["runs"]
    assert sorted(r["info"]["run_id"] for r in listed) == sorted(r.info.run_id for r in runs)


def start_together(uri: str, experiment: str, params: dict, model, barrier, results) -> None:
    """A forked writer: at the barrier, what `train` does first: get-or-create the experiment, start a run, log
    params, tags and the prepared data as a dataset input (the same for every writer)."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    manifest = {"dataset": "digits", "digest": "c" * 64, "source": {"path": None}}
    barrier.wait()
    try:
        with Tracker.connect(params["tracking"] | {"experiment": experiment}).training_run(params, manifest, model,
                                                                                            "CPU"):
            pass
        results.put("ok")
    except BaseException as exc:  # reported to the test, which shows it with what MLflow raised underneath
        results.put(f"{type(exc).__name__}: {exc} (from {exc.__context__!r})")


def test_writers_starting_together_share_a_new_experiment_and_dataset_without_errors(team, repo):
    """A server has no lock across its clients: four runs racing to create the same experiment and dataset row
    must all start (the losing inserts find the winner's row), in every round."""
    import keras

    params = load_params(str(repo / "params.yaml"), [])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    ctx = multiprocessing.get_context("fork")  # after the imports: the four start within milliseconds
    for round_ in range(3):
        experiment, barrier, results = f"race-{round_}", ctx.Barrier(4), ctx.Queue()
        writers = [ctx.Process(target=start_together, args=(team.uri, experiment, params, model, barrier, results))
                   for _ in range(4)]
        for writer in writers:
            writer.start()
        outcomes = [results.get(timeout=120) for _ in writers]
        for writer in writers:
            writer.join(timeout=30)
        assert outcomes == ["ok"] * 4, f"{outcomes}\n--- the MLflow server's log:\n{team.log_tail()}"
        runs = finished_runs(team.uri, experiment)
        assert len(runs) == 4 and all(len(r.inputs.dataset_inputs) == 1 for r in runs)
        assert len({r.inputs.dataset_inputs[0].dataset.digest for r in runs}) == 1


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """OpenSSH's sshd on 127.0.0.1, key login only; a HOME whose known_hosts trusts it (as after a first ssh)."""
    if not os.access(SSHD, os.X_OK):
        pytest.fail(f"{SSHD} is missing; run `make system-deps` as root (apt-get install openssh-server)")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], root)
    shutil.copy(root / "client.pub", root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPidFile none\n"
        "Subsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder, which Debian makes at boot
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    host_key = " ".join((root / "host.pub").read_text().split()[:2])
    (home / ".ssh/known_hosts").write_text(f"[127.0.0.1]:{port} {host_key}\n")
    with open(root / "sshd.log", "w") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: listening(port) or proc.poll() is not None, 30, "sshd to listen")
        assert proc.poll() is None, (root / "sshd.log").read_text()
        yield SimpleNamespace(url=f"ssh://{getpass.getuser()}@127.0.0.1:{port}{root / 'remote'}",
                              key=root / "client", remote=root / "remote", env=pipeline_env(HOME=str(home)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_dvc_remote_over_ssh_push_then_pull_into_a_fresh_clone_leaves_nothing_to_rerun(repo, local_run, sshd,
                                                                                       tmp_path):
    env = sshd.env
    run(["dvc", "remote", "add", "--default", "team", sshd.url], repo, env)
    run(["git", "commit", "-qam", "the team's DVC remote"], repo, env)
    run(["dvc", "remote", "modify", "--local", "team", "keyfile", str(sshd.key)], repo, env)
    assert "files pushed" in run(["dvc", "push"], repo, env).stdout
    assert any(p.is_file() for p in sshd.remote.rglob("*")), "the remote is empty after dvc push"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "models/model.keras").exists()
    run(["dvc", "remote", "modify", "--local", "team", "keyfile", str(sshd.key)], clone, env)
    run(["dvc", "pull"], clone, env)
    assert cached_files(clone) == cached_files(repo)
    again = run(["dvc", "repro"], clone, env)
    assert stages_run(again.stdout) == list(ALWAYS_RUN), again.stdout
    assert dvc_status(clone, env) == ALWAYS_RUN


def test_sigterm_stops_mlflow_and_postgres_and_a_restart_keeps_the_runs(team):
    client = MlflowClient(team.uri)
    exp = client.get_experiment_by_name("restart") or client.get_experiment(client.create_experiment("restart"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    client.log_metric(run_id, "loss", 0.25, step=1)
    client.set_terminated(run_id)
    postgres = team.postmaster_pid()

    assert team.stop(signal.SIGTERM) == 0, team.text()
    assert "imgclf-team: stopped; data kept in" in team.text()
    assert not listening(team.port) and team.postmaster_pid() is None and not Path(f"/proc/{postgres}").exists()

    offset = len(team.text())
    team.start()
    assert f"PostgreSQL (reused in {team.root / 'data/postgres'}" in team.text(offset)
    assert [(m.step, m.value) for m in MlflowClient(team.uri).get_metric_history(run_id, "loss")] == [(1, 0.25)]
