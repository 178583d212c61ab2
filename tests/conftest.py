"""Shared fixtures and helpers: a temporary git+DVC copy of the repo, one tiny trained repo shared by the session,
real MLflow servers, ports that no two tests share, tiny settings, polling, and the undoing of what a test leaves
behind in this process (environment, signal handlers, op determinism) or on the machine (processes, temp files)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


# Set by the session for every process it starts (see session_temp_dir), not a user's setting to strip.
HARNESS_VARIABLES = ("DVC_SITE_CACHE_DIR",)


def set_args(overrides: dict[str, str], flag: str = "-S") -> list[str]:
    """{'a.b': '1'} -> ['-S', 'a.b=1'] for `dvc exp run` and `imgclf`."""
    return [arg for key, value in overrides.items() for arg in (flag, f"{key}={value}")]


def pipeline_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has after `make setup`: .venv/bin first, no stray tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) or k in HARNESS_VARIABLES}
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


# dvc.yaml's always_changed stage: it reads the data source on every `dvc repro`, so `dvc status` always lists it.
ALWAYS_RUN = {"fingerprint": ["always changed"]}


def dvc_status(repo: Path, env: dict | None = None) -> dict:
    """`dvc status` as a dict: stage -> what changed (ALWAYS_RUN when everything is up to date)."""
    return json.loads(run(["dvc", "status", "--json"], repo, env).stdout)


def stages_run(stdout: str) -> list[str]:
    """The stages a `dvc repro`/`dvc exp run` output says it ran, in order."""
    return re.findall(r"Running stage '([^']+)'", stdout)


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


def kill_processes_in(folder: Path) -> list[int]:
    """SIGKILL every process (but this one) working under `folder`, and return their pids: what a test started
    there and lost track of, like the training of a queue worker it killed, which DVC had detached from it."""
    folder, killed = folder.resolve(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, a zombie (no cwd), or not ours
            cwd = Path(os.readlink(entry / "cwd"))
            if cwd == folder or folder in cwd.parents:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


@contextlib.contextmanager
def reaped(folder: Path):
    """`folder`, and afterwards no process left running in it."""
    try:
        yield folder
    finally:
        kill_processes_in(folder)


@pytest.fixture
def repo_copy(tmp_path: Path):
    with reaped(copy_repo(tmp_path / "repo")) as repo:
        yield repo


# --- one tiny trained repo for the session ---------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """A committed repo after `dvc exp run` with TINY: outputs, DVC cache, its own MLflow store with one run.

    Shared by every test (and every xdist worker) of the session: read its files, never change or run in it;
    tests that do either take `trained_copy`. `status` is `git status --porcelain --untracked-files=all`
    right after the run, before the commit."""

    repo: Path
    status: str
    run_id: str


def build_trained(dest: Path) -> Trained:
    """The shared run: `dvc exp run` with TINY in a fresh copy of the repo, then `git commit` of all it wrote."""
    repo = copy_repo(dest)
    run(["dvc", "exp", "run", *set_args(TINY)], repo)
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny run"], repo)
    run_id = json.loads((repo / "reports/run.json").read_text())["mlflow_run_id"]
    return Trained(repo, status, run_id)


def shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (each worker's basetemp lies in it), or basetemp alone."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """Built once per run, whichever worker asks first; the others wait on the lock, then read its record."""
    shared = shared_dir(tmp_path_factory)
    record = shared / "trained.json"
    with open(shared / "trained.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            with reaped(shared / "trained"):
                built = build_trained(shared / "trained")
            record.write_text(json.dumps({**built.__dict__, "repo": str(built.repo)}))
    fields = json.loads(record.read_text())
    return Trained(**fields | {"repo": Path(fields["repo"])})


def rehome_store(db: Path, old: Path, new: Path) -> None:
    """Rewrite `old` to `new` in every text of a copied sqlite store. MLflow stores absolute artifact URIs
    (`old`/mlruns/...), so without this the copy's new runs would write their artifacts into the original."""
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if any(text in kind.upper() for text in ("CHAR", "TEXT", "CLOB")):
                    con.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                                f'WHERE instr("{column}", ?)', (str(old), str(new), str(old)))


def copy_trained(trained: Trained, dest: Path) -> Path:
    """A private copy of the trained repo (`cp -a`: git, DVC cache, outputs, MLflow store), to change or run in."""
    subprocess.run(["cp", "-a", str(trained.repo), str(dest)], check=True)
    rehome_store(dest / "mlflow.db", trained.repo, dest)
    return dest


@pytest.fixture
def trained_copy(trained: Trained, tmp_path: Path):
    with reaped(copy_trained(trained, tmp_path / "repo")) as repo:
        yield repo


@pytest.fixture
def prepared_copy(trained_copy: Path) -> Path:
    """A repo copy as after `imgclf prepare` with TINY: the shared run's data/prepared and nothing later
    (no model, reports, checkpoint or MLflow store)."""
    for name in ("models", "reports", "mlruns"):
        shutil.rmtree(trained_copy / name)
    (trained_copy / "mlflow.db").unlink()
    return trained_copy


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store: creating MLflow's tables takes seconds, copying the file does not."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def store_in(folder: Path, empty_store: Path) -> str:
    """A copy of the empty store as `folder`/mlflow.db (the default store of a repo there); its URI."""
    shutil.copy(empty_store, folder / "mlflow.db")
    rehome_store(folder / "mlflow.db", empty_store.parent, folder)
    return f"sqlite:///{folder / 'mlflow.db'}"


# --- ports --------------------------------------------------------------------------------------------------

# Below the kernel's ephemeral range (32768-60999 by default), where bind(("", 0)) and outgoing connections take
# their ports: a port found free there is free only until the kernel hands it to someone else, which, between
# our close and the server's bind, happened. Each process gets its own block here, walked in turn.
PORTS_FROM, PORTS_TO, BLOCK = 10000, 32000, 100
_next_ports = itertools.count()


def free_port() -> int:
    """A port of this process's own block that nothing listens on now (checked by binding it)."""
    block = PORTS_FROM + (os.getpid() * BLOCK) % (PORTS_TO - PORTS_FROM)
    for _ in range(BLOCK):
        port = block + next(_next_ports) % BLOCK
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use (another session's block overlaps ours)
                continue
            return port
    pytest.fail(f"no free port in {block}..{block + BLOCK - 1}")


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
        # Without MLflow's job runner (GenAI jobs), as `imgclf-team serve` runs it: its eight or so consumer
        # processes, each importing MLflow, cost more CPU than the rest of the server's start, and training
        # runs never use them.
        env = pipeline_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its workers die with it in kill()
        try:
            wait_until(self._healthy, 90, f"mlflow server on {self.uri}", interval=0.3)
        except BaseException:  # a failed start must not leave the server (or its workers) running
            self.kill()
            raise

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


# --- what a test leaves behind ------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def session_temp_dir(tmp_path_factory):
    """One folder for what this session's processes write to /tmp and /var/tmp, removed at the end: imgclf's
    lock file per sqlite store, TensorFlow's autograph files, DVC's site cache (a folder per repo). Each
    temporary repo used to add its own, never removed."""
    tmp_path_factory.getbasetemp()  # pytest's own folders stay where they are
    folder = Path(tempfile.mkdtemp(prefix="imgclf-tests-"))
    folder.chmod(0o755)  # the team server's PostgreSQL (user postgres) must reach its folder in here
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "DVC_SITE_CACHE_DIR")}
    os.environ.update(TMPDIR=str(folder), DVC_SITE_CACHE_DIR=str(folder / "dvc-site-cache"))
    tempfile.tempdir = None  # this process's cached default: recomputed from TMPDIR
    yield folder
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.update({name: value})
    tempfile.tempdir = None
    shutil.rmtree(folder, ignore_errors=True)


def tensorflow_switches() -> tuple[bool, bool] | None:
    """(op determinism, TF32) when this process has TensorFlow loaded: seed_everything sets both for good."""
    if "tensorflow" not in sys.modules:
        return None
    from tensorflow.python.framework import config

    return config.is_op_determinism_enabled(), config.tensor_float_32_execution_enabled()


def restore_tensorflow_switches(saved: tuple[bool, bool] | None) -> None:
    """Back to `saved`, or to TensorFlow's defaults when it was loaded during the test."""
    if "tensorflow" not in sys.modules:
        return
    from tensorflow.python.framework import config

    determinism, tf32 = saved or (False, True)
    (config.enable_op_determinism if determinism else config.disable_op_determinism)()
    config.enable_tensor_float_32_execution(tf32)


def mlflow_uri_module():
    """MLflow's module holding the tracking URI set in-process, when MLflow is loaded."""
    return sys.modules.get("mlflow.tracking._tracking_service.utils")


@pytest.fixture(autouse=True)
def undo_process_changes():
    """Undo what a test changed in this process that later tests would inherit, whatever their order:
    - the environment: mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI (MLflow 3.17), and
      tracking.configure sets the HTTP retry defaults, so a store would leak into every later test;
    - MLflow's in-process tracking URI;
    - SIGINT/SIGTERM handlers, which cli.main installs, and the signals imgclf.errors recorded;
    - TensorFlow's op determinism and TF32 switches (seed_everything), which have no scoped form;
    - objects frozen out of the garbage collector (process.imports_first, which the commands call)."""
    environ = dict(os.environ)
    frozen = gc.get_freeze_count()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    module = mlflow_uri_module()
    uri = module._tracking_uri if module else None
    switches = tensorflow_switches()
    yield
    restore_tensorflow_switches(switches)
    for signum, handler in handlers.items():
        if handler is not None:  # None: installed outside Python, nothing we can put back
            signal.signal(signum, handler)
    if errors := sys.modules.get("imgclf.errors"):
        errors._signals.clear()
        errors._deferring[0] = False
    if module := mlflow_uri_module():
        module._tracking_uri = uri
    if gc.get_freeze_count() and not frozen:
        gc.unfreeze()
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    os.environ.update(environ)


# --- order: the long tests first ---------------------------------------------------------------------------


def start_rank(item: pytest.Item) -> tuple[int, float]:
    """Marked `long(seconds)` first, the longest first; then the other end-to-end tests; then the rest."""
    long = item.get_closest_marker("long")
    return (0, -long.args[0]) if long else (1, 0) if item.get_closest_marker("e2e") else (2, 0)


GROUP_LOST = pytest.StashKey[str]()


def check_groups_took(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker of `--dist loadgroup`, each grouped test's id must end in `@<group>`: that suffix is
    all the scheduler goes by. pytest 9.2 dropped it without a word (pytest-dev/pytest-xdist#1386), and the
    `team` tests then each started their own PostgreSQL and MLflow server on every worker. Such a test fails
    at setup, naming the cause (an error raised here would crash the worker and lose the message)."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                         for mark in item.iter_markers("xdist_group")})
        if groups and not item.nodeid.endswith("@" + "_".join(groups)):
            item.stash[GROUP_LOST] = (f"its xdist_group {groups} did not take under pytest {pytest.__version__} "
                                      "(pytest-dev/pytest-xdist#1386): `make setup` installs requirements.lock's")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if GROUP_LOST in item.stash:
        pytest.fail(item.stash[GROUP_LOST], pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests start first, the longest first, and short ones fill the end. The suite is CPU-bound on 2
    cores: a long test that happened to start last in the shuffled order ran by itself while the other
    workers had nothing left, and each worker holds its next 2 tests, so two long ones queued on one worker
    behind a third cost minutes.
    The sort is stable and runs after pytest-randomly's shuffle, so the order within each rank stays random
    (and reproducible from its seed); xdist sends whole `xdist_group`s before single tests anyway."""
    check_groups_took(config, items)
    items.sort(key=start_rank)
