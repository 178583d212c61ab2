"""Shared fixtures and helpers: a temporary git+DVC copy of the repo, real MLflow servers, tiny settings, polling."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Tiny settings so a whole pipeline run takes seconds: a 2-block net, 200 digits, 2 epochs.
TINY = {
    "train.training_epochs": "2",
    "data.max_train_samples": "200",
    "model.conv_blocks": "[[8], [16]]",
    "model.dense_units": "[32]",
}
# Tiny training that runs until it is interrupted (~100 s): without the patience, TINY early-stops after ~5 s.
UNTIL_INTERRUPTED = TINY | {"train.training_epochs": "500", "train.early_stopping.patience": "500"}
# The fast family, as tiny: narrow blocks, small batches, a few epochs, every ingredient on (lookahead from
# epoch 3, augmentation, the whitening bias frozen after epoch 3, TTA in evaluate).
FAST_TINY = {
    "model.arch": "fast",
    "model.fast.widths": "[8, 16, 16]",
    "model.fast.whiten_images": "100",
    "train.batch_size": "32",
    "train.training_epochs": "6",
    "train.early_stopping.monitor": "none",
    "data.max_train_samples": "300",
    "evaluate.tta": "flip_translate",
}


def set_args(overrides: dict[str, str], flag: str = "-S") -> list[str]:
    """{'a.b': '1'} -> ['-S', 'a.b=1'] for `dvc exp run` and `imgclf`."""
    return [arg for key, value in overrides.items() for arg in (flag, f"{key}={value}")]


def pipeline_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has after `make setup`: .venv/bin first, no stray tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2", CI="true",
               GIT_AUTHOR_NAME="imgclf-tests", GIT_AUTHOR_EMAIL="tests@localhost",
               GIT_COMMITTER_NAME="imgclf-tests", GIT_COMMITTER_EMAIL="tests@localhost")
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it fails unexpectedly."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or pipeline_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def error_line(stderr: str, command: str) -> str:
    """The single `imgclf <command>: error: ...` line in `stderr` (there must be exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"imgclf {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def copy_repo(dest: Path) -> Path:
    """Copy the repo's tracked and unignored files into `dest` and commit them (dvc exp needs a commit)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for noise in ("reports", "models"):  # the committed run's outputs: the copy produces its own
        shutil.rmtree(dest / noise, ignore_errors=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    env = pipeline_env()
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, dest, env)
    return dest


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition()` until it returns something truthy (returned); fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def write_params(repo: Path, overrides: dict[str, str], check: bool = True) -> str:
    """Apply `-S`-style overrides to the repo's params.yaml (validated unless `check` is False); return the text."""
    from imgclf.config import apply_overrides, parse_yaml, validate

    params = apply_overrides(parse_yaml((repo / "params.yaml").read_text()), [f"{k}={v}" for k, v in overrides.items()])
    text = yaml.safe_dump(validate(params) if check else params, sort_keys=False)
    (repo / "params.yaml").write_text(text)
    return text


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 with a sqlite backend under `root`, in its own process group."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.uri = root, f"http://127.0.0.1:{free_port()}"
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
               "--port", self.uri.rsplit(":", 1)[1], "--workers", "1"]
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=root, env=pipeline_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its workers die with it in kill()
        wait_until(self._healthy, 90, f"mlflow server on {self.uri}", interval=0.3)

    def _healthy(self) -> bool:
        """Whether /health answers; fails the test at once if the server process died."""
        if self.proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
        try:
            return requests.get(f"{self.uri}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server and all its workers; SIGKILL waits until they are gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=30)
            self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 shared by the session's tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server.uri
    server.kill(signal.SIGTERM)
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    server.kill()


def finished_runs(uri: str, experiment: str) -> list:
    """The runs of `experiment` in the store at `uri`, oldest first (any status)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def wait_for_metric(uri: str, experiment: str, key: str, timeout: float = 120.0):
    """The first run of `experiment` once it has logged `key`, polling the store."""
    def logged():
        runs = finished_runs(uri, experiment)
        return runs[0] if runs and key in runs[0].data.metrics else None

    return wait_until(logged, timeout, f"a run of {experiment} logging {key}", interval=0.5)
