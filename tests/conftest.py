"""Shared fixtures: a temporary git+DVC copy of the repo, a real MLflow server, tiny settings."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Tiny settings so a whole pipeline run takes seconds: a 2-block net, 200 digits, 2 epochs.
TINY = {
    "train.training_epochs": "2",
    "data.max_train_samples": "200",
    "model.conv_blocks": "[[8], [16]]",
    "model.dense_units": "[32]",
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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend in a temp dir."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=pipeline_env(), stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}")
    else:
        proc.kill()
        pytest.fail("mlflow server did not start in 90 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
