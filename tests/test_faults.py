"""The faults real machines have (issue 22), one case per class: a corrupt or locked tracking store, two runs in
one workspace, inputs built to exhaust memory, permissions, a full disk, a hung or flaky tracking server. Each
ends in one line and exit 2 with nothing lost, or, for the flaky server, in a complete run. Real imgclf, MLflow
and SQLite; the fake servers are stdlib test doubles of the network only. `python scripts/fault_matrix.py` runs
the whole fault x stage table (not part of the suite)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from conftest import REPO, TINY, error_line, finished_runs, pipeline_env, run, set_args

ROOT = os.geteuid() == 0
# Root ignores file permissions: its commands run without the capabilities that let it (setpriv, util-linux).
AS_USER = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if ROOT else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def workspace(tmp_path: Path) -> Path:
    """A folder with the project's params.yaml: enough for every refusal that comes before a stage's work."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    return ws


def imgclf(ws: Path, *args: str, prefix: list[str] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    return run([*prefix, "imgclf", *args], ws, check=False, timeout=timeout)


def refused(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a command that must have stopped with exit 2 and no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return error_line(proc.stderr, command)


# -- 2. a corrupt, foreign or locked tracking store ------------------------------------------------------------

def mlflow_store(path: Path) -> Path:
    """A real, empty MLflow sqlite store at `path` (made by MLflow itself)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def foreign_sqlite(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()


STORES = {  # what each damage looks like, and how the line names it
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(40_000)), "not an SQLite database"),
    "text": (lambda p: p.write_text("experiment,run\nimgclf,1\n"), "not an SQLite database"),
    "empty": (lambda p: p.write_bytes(b""), "empty file"),
    "foreign sqlite": (lambda p: (p.unlink(), foreign_sqlite(p)), "an SQLite database but not an MLflow store"),
}


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> Path:
    return mlflow_store(tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.mark.parametrize("damage", STORES)
def test_a_damaged_or_foreign_store_is_refused_and_never_modified(damage, good_store, tmp_path):
    from imgclf.tracking.failures import TrackingError
    from imgclf.tracking.store import check_sqlite_store

    path = tmp_path / "mlflow.db"
    shutil.copy(good_store, path)
    spoil, problem = STORES[damage]
    spoil(path)
    before = sha256(path)
    with pytest.raises(TrackingError) as refusal:
        check_sqlite_store(f"sqlite:///{path}")
    assert f"MLflow tracking store {path}: {problem}" in str(refusal.value) and "mv " in str(refusal.value)
    assert sha256(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_connecting_refuses_a_damaged_default_store_before_mlflow_touches_it(good_store, tmp_path, monkeypatch):
    """What `train`, `evaluate` and `experiments` call first (tracking.configure), on the repo's own store."""
    from imgclf.tracking import store as tracking

    shutil.copy(good_store, tmp_path / "mlflow.db")
    STORES["truncated"][0](tmp_path / "mlflow.db")
    before = sha256(tmp_path / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tracking.TrackingError, match=f"MLflow tracking store {tmp_path / 'mlflow.db'}: truncated"):
        tracking.configure()
    assert sha256(tmp_path / "mlflow.db") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_store_locked_by_another_process_ends_the_bounded_wait_with_one_line(good_store, tmp_path, monkeypatch):
    from imgclf.tracking import store as tracking

    monkeypatch.setattr(tracking, "STORE_BUSY_SECONDS", 1.0)
    path = tmp_path / "mlflow.db"
    shutil.copy(good_store, path)
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
                               "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(tracking.TrackingError, match="locked by another process for more than 1 s"):
            tracking.check_sqlite_store(f"sqlite:///{path}")
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


# -- 4. two runs in one workspace -------------------------------------------------------------------------------

HOLD_IMGCLF = "from imgclf.workspace import workspace_lock\nwith workspace_lock('train'):\n"
HOLD_DVC = ("import os, zc.lockfile\nos.makedirs('.dvc/tmp', exist_ok=True)\n"
            "lock = zc.lockfile.LockFile('.dvc/tmp/lock')\nif True:\n")  # DVC's own lock library


def hold(ws: Path, code: str) -> subprocess.Popen:
    """A process holding a lock in `ws` until killed (it prints 'held' once it holds it)."""
    body = code + "    print('held', flush=True)\n    import time; time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", body], cwd=ws, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("holder, named", [(HOLD_IMGCLF, "imgclf train (pid {pid}, since "),
                                           (HOLD_DVC, "a DVC command (pid {pid}, e.g. dvc repro)")],
                         ids=["imgclf train", "dvc repro"])
def test_a_second_writer_refuses_at_once_naming_the_holder_and_a_killed_ones_lock_is_cleared(holder, named,
                                                                                              tmp_path):
    ws = workspace(tmp_path)
    first = hold(ws, holder)
    try:
        started = time.monotonic()
        line = refused(imgclf(ws, *set_args(TINY), "train"), "train")
        assert time.monotonic() - started < 15  # at once: no wait for the holder (only imgclf's start-up)
        assert line.startswith(f"imgclf train: error: {ws}: in use by {named.format(pid=first.pid)}")
        assert not (ws / "models").exists() and not (ws / "reports").exists()
    finally:
        first.kill()  # kill -9: the kernel drops its flock, the lock file still names it
        first.wait()
    proc = imgclf(ws, *set_args(TINY), "prepare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    if holder is HOLD_IMGCLF:
        assert f"left by imgclf train (pid {first.pid}, since " in proc.stdout and "which is gone" in proc.stdout


# -- 6. inputs built to exhaust resources ------------------------------------------------------------------------

BILLION_LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * 10)}]\n" for i in range(9))


def test_a_billion_laughs_params_file_is_refused_in_bounded_time(tmp_path):
    ws = workspace(tmp_path)
    text = (ws / "params.yaml").read_text().replace("dense_units: [2048, 2048]", "dense_units: *l8")
    (ws / "params.yaml").write_text(BILLION_LAUGHS + text)  # 10**9 values under model.dense_units
    started = time.monotonic()
    line = refused(imgclf(ws, "validate", timeout=60), "validate")
    assert time.monotonic() - started < 20
    assert line.startswith("imgclf validate: error: params.yaml: its aliases expand to more than 100,000 values")


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A 1-bit PNG of width x height black pixels: a few KB on disk, width * height bytes once decoded."""
    row = b"\x00" + bytes((width + 7) // 8)
    pixels = zlib.compressobj(9)
    data = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_in_a_folder_data_set_is_refused_in_bounded_memory(tmp_path):
    from PIL import Image

    ws, data = workspace(tmp_path), tmp_path / "images"
    for label in ("cat", "dog"):
        (data / "train" / label).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(data / "train" / label / f"{i}.png")
    # 12000 x 12000 = 144 Mpx: under Pillow's own error limit (179 Mpx), ~0.6 GB to decode and convert to RGB
    bomb = png_bomb(data / "train" / "dog" / "bomb.png", 12_000, 12_000)
    assert bomb.stat().st_size < 100_000
    proc, peak_mb = peak_rss_mb(["imgclf", "-S", "data.dataset=folder", "-S", f"data.path={data}", "prepare"], ws)
    line = refused(proc, "prepare")
    assert line.startswith(f"imgclf prepare: error: {bomb}: 12000x12000 pixels, more than the 40 Mpx")
    assert peak_mb < 400, f"prepare peaked at {peak_mb:.0f} MB"  # its imports take ~150 MB; the bomb ~600 MB more
    assert not (ws / "data" / "prepared").exists()


# A fork of this (large) test process would count our own memory as the child's peak: a small Python starts it.
PEAK_RSS = ("import resource, subprocess, sys\n"
            "code = subprocess.run(sys.argv[1:]).returncode\n"
            "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
            "sys.exit(code)")


def peak_rss_mb(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`; its result and its peak resident memory in MB."""
    proc = run([sys.executable, "-c", PEAK_RSS, *cmd], cwd, check=False, timeout=120)
    peak = proc.stderr.rstrip().rsplit("peak_rss_kb=", 1)[1]
    proc.stderr = proc.stderr.rsplit("peak_rss_kb=", 1)[0]
    return proc, int(peak) / 1024


# -- 5. permissions ----------------------------------------------------------------------------------------------

def read_only(ws: Path, name: str) -> Path:
    """`ws/name` with a file in it, made read-only."""
    folder = ws / name
    folder.mkdir()
    (folder / "kept.txt").write_text("an earlier output")
    folder.chmod(0o555)
    return folder


def unreadable(ws: Path, name: str) -> Path:
    """A folder data set at `ws/../name` nobody may list."""
    folder = ws.parent / name
    (folder / "train" / "cat").mkdir(parents=True)
    folder.chmod(0)
    return folder


PERMISSIONS = {  # case: (command, make the culprit, extra -S, the line after `<culprit>: `)
    "read-only models/": ("train", lambda ws: read_only(ws, "models"), {},
                          "not writable (Permission denied); fix its permissions (e.g. chmod u+w {p}) and rerun"),
    "read-only reports/": ("evaluate", lambda ws: read_only(ws, "reports"), {},
                           "not writable (Permission denied); fix its permissions (e.g. chmod u+w {p}) and rerun"),
    "unreadable data.path": ("prepare", lambda ws: unreadable(ws, "images"), {"data.dataset": "folder"},
                             "unreadable (Permission denied); fix its permissions (chmod -R u+rX {p}) and rerun"),
}


@pytest.mark.skipif(ROOT and not shutil.which("setpriv"), reason="root ignores permissions without setpriv")
@pytest.mark.parametrize("case", PERMISSIONS)
def test_permissions_are_one_line_before_any_work_and_nothing_is_lost(case, tmp_path):
    command, make, extra, problem = PERMISSIONS[case]
    ws = workspace(tmp_path)
    culprit = make(ws)
    extra = extra | ({"data.path": str(culprit)} if command == "prepare" else {})
    try:
        line = refused(imgclf(ws, *set_args(TINY | extra), command, prefix=AS_USER), command)
    finally:
        culprit.chmod(0o755)
    assert line.startswith(f"imgclf {command}: error: {culprit}: {problem.format(p=culprit)}"), line
    assert all(p.read_text() == "an earlier output" for p in culprit.glob("*.txt"))
    assert {p.name for p in ws.iterdir()} <= {".imgclf.lock.tmp", "params.yaml", culprit.name}  # nothing written


# -- 1. a full disk ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Path:
    """A tmpfs of `size` mounted at `folder` (root only), always unmounted again."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)]).returncode:
            subprocess.run(["umount", "-l", str(folder)])  # still busy: detach it now, freed when released


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_full_disk_in_prepare_is_one_line_keeps_the_old_arrays_and_a_rerun_succeeds(tmp_path):
    ws = workspace(tmp_path)
    with small_disk(ws / "data", "1m") as data:  # holds one TINY data/prepared (~620 KB), not two
        assert imgclf(ws, *set_args(TINY), "prepare").returncode == 0
        before = {p.name: sha256(p) for p in (data / "prepared").iterdir()}
        line = refused(imgclf(ws, *set_args(TINY | {"seed": "7"}), "prepare"), "prepare")
        assert line.startswith("imgclf prepare: error: data/prepared: could not be written (No space left on "
                               "device; "), line
        assert " free); free disk space and rerun" in line
        assert {p.name: sha256(p) for p in (data / "prepared").iterdir()} == before
        assert [p.name for p in data.iterdir()] == ["prepared"]  # no temp folder left behind
        subprocess.run(["mount", "-o", "remount,size=4m", str(data)], check=True)  # space freed
        assert imgclf(ws, *set_args(TINY | {"seed": "7"}), "prepare").returncode == 0
        assert json.loads((data / "prepared/manifest.json").read_text())["seed"] == 7


# -- 3. a hung or flaky tracking server ---------------------------------------------------------------------------

@contextlib.contextmanager
def hung_server():
    """A server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_a_hung_tracking_server_ends_within_the_documented_bound_in_one_line():
    from imgclf.tracking import store as tracking

    with hung_server() as uri:
        started = time.monotonic()
        with pytest.raises(tracking.TrackingError) as refusal:
            tracking.check_reachable(uri)
        seconds = time.monotonic() - started
    assert str(refusal.value) == (f"MLflow tracking server {uri} is unreachable (ReadTimeout); start it or "
                                  "fix/unset MLFLOW_TRACKING_URI")
    assert 4 < seconds < 8  # docs/reliability.md: 5 s


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to a real MLflow server, but answers the first `fail_first` requests 503 and resets the
    connection of the first request logging a per-epoch metric after the server has stored it; with `hang`,
    never answers any request after that one (scripts/fault_matrix.py: a server hanging mid-run)."""

    daemon_threads = True

    def __init__(self, upstream: str, fail_first: int, hang: bool = False):
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.upstream, self.fail_first, self.hang = upstream.removeprefix("http://"), fail_first, hang
        self.count, self.failed, self.resets, self.lock = 0, 0, 0, threading.Lock()
        self.uri = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        pass  # the reset connection's handler fails to finish its reply: expected


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def forward(self) -> None:
        proxy: FlakyProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with proxy.lock:
            proxy.count += 1
            fail = proxy.count <= proxy.fail_first
            proxy.failed += fail
        while proxy.hang and proxy.resets:
            time.sleep(1)
        if fail:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body, headers)
        reply = upstream.getresponse()
        data = reply.read()
        upstream.close()
        with proxy.lock:
            reset = not proxy.resets and self.path.endswith("/runs/log-batch") and b'"dev/loss"' in body
            proxy.resets += reset
        if reset:  # stored upstream, then the connection dies before the reply: the client must retry
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward


def test_a_server_answering_every_try_with_5xx_is_named_failing_not_gone(monkeypatch):
    import mlflow

    from imgclf.tracking import failures as tracking

    proxy = FlakyProxy("127.0.0.1:9", fail_first=10**9)  # up, but answers 503 to every request: no upstream used
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the user's settings win over imgclf's defaults
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    mlflow.set_tracking_uri(proxy.uri)
    try:
        with pytest.raises(tracking.TrackingError) as failed, tracking.store_errors("rerun"):
            mlflow.search_experiments()
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.failed == 2  # the try and its one retry
    assert str(failed.value) == (f"MLflow tracking server {proxy.uri} answered HTTP 503 to every try (gave up "
                                 "after 1 retries); its log says why: fix the server, then rerun")


@pytest.mark.long(44)
@pytest.mark.e2e
def test_a_flaky_tracking_server_is_retried_and_every_epoch_metric_is_logged_exactly_once(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from imgclf.metrics import EPOCH_METRICS
    from imgclf.tracking.keys import metric_key

    ws, experiment = workspace(tmp_path), f"flaky-{os.getpid()}-{time.time_ns()}"
    proxy = FlakyProxy(mlflow_server, fail_first=3)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        tiny = set_args(TINY | {"tracking.experiment": experiment})
        run(["imgclf", *tiny, "prepare"], ws)
        run(["imgclf", *tiny, "train"], ws, pipeline_env(MLFLOW_TRACKING_URI=proxy.uri))
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.failed == 3 and proxy.resets == 1  # the faults did happen
    [trained] = finished_runs(mlflow_server, experiment)
    assert trained.info.status == "FINISHED"
    client, epochs = MlflowClient(mlflow_server), int(trained.data.metrics["epochs_run"])
    logged = [key for key in map(metric_key, EPOCH_METRICS) if key in trained.data.metrics]
    assert "train/loss" in logged and "dev/loss" in logged
    for key in logged:
        steps = sorted(m.step for m in client.get_metric_history(trained.info.run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)  # no gap, no duplicate


# -- 7. kill -9 during `imgclf experiments` (the whole run: scripts/fault_matrix.py) --------------------------------

def test_experiments_a_killed_run_had_queued_are_adopted_not_queued_again(tmp_path):
    from imgclf.experiments.dvc_queue import Job, adopt, journal, record

    def grid() -> list[Job]:
        return [Job(f"shallow seed {s}", ["dvc", "exp", "run", "--queue", "-S", f"seed={s}"]) for s in (1, 2, 3)]

    killed = grid()
    killed[0].name, killed[1].name = "exp-one", "exp-two"  # queued before the kill -9; seed 3 was not
    record(tmp_path, killed)
    assert journal(tmp_path).is_file()
    again = grid()
    again[1].args = again[1].args + ["-S", "train.training_epochs=3"]  # not the same experiment any more
    assert adopt(tmp_path, again) == 1
    assert [job.name for job in again] == ["exp-one", "", ""]
