"""The prepare stage (imgclf.prepare): seeded stratified splits, chunked writes, atomic replacement, and the
worker processes that decode a folder (in order, in bounded memory, none left behind)."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, pipeline_env, reaped, wait_until
from fakes import make_folder, make_npz, make_params, save_image, snapshot, write_cifar
from imgclf import prepare as prepare_stage
from imgclf.errors import DataError, ImgclfError
from imgclf.files.atomic import WriteError
from imgclf.files.digests import sha256_array
from imgclf.prepare import prepare
from imgclf.data.sources import folder
from imgclf.data.sources.digits import load_digits_source
from imgclf.data.decode_pool import Workers

REPO_PARAMS = REPO / "params.yaml"


def test_split_is_stratified_deterministic_and_seeded(tmp_path):
    first = prepare(make_params(seed=1), tmp_path / "a")
    again = prepare(make_params(seed=1), tmp_path / "b")
    other = prepare(make_params(seed=2), tmp_path / "c")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert first["digest"] == again["digest"] != other["digest"]
    assert not np.array_equal(np.load(tmp_path / "a" / "y_dev.npy"), np.load(tmp_path / "c" / "y_dev.npy"))
    totals = np.bincount(np.concatenate([np.load(tmp_path / "a" / f"y_{s}.npy") for s in ("train", "dev")]))
    dev = np.array(list(first["splits"]["dev"]["per_class"].values()))
    assert np.all(np.abs(dev - totals * 0.1) <= 1)


@pytest.mark.parametrize("chunk", [1, 300, 4096])
def test_split_rows_are_written_chunk_by_chunk_exactly_like_np_save(tmp_path, chunk):
    source = load_digits_source()
    rows = np.random.default_rng(0).permutation(len(source.y))[:1000]
    for array in (source.x, source.y):
        digest = prepare_stage._save_rows(tmp_path / "chunked.npy", array, rows, chunk)
        np.save(tmp_path / "whole.npy", array[rows])
        assert (tmp_path / "chunked.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
        assert digest == sha256_array(array[rows])


def test_max_train_samples(tmp_path):
    manifest = prepare(make_params(max_train_samples=200, dev_fraction=0.2), tmp_path / "out")
    assert manifest["splits"]["train"]["count"] == 160 and manifest["splits"]["dev"]["count"] == 40
    for split, expected in (("train", 16), ("dev", 4)):
        assert all(abs(n - expected) <= 1 for n in manifest["splits"][split]["per_class"].values())
    assert manifest["max_train_samples"] == 200


def test_impossible_stratification_names_class(tmp_path):
    with pytest.raises(DataError, match="class '.'.*max_train_samples"):
        prepare(make_params(max_train_samples=20, dev_fraction=0.1), tmp_path / "out")
    npz = make_npz(tmp_path / "d.npz", n=9, test=False, y_train=np.array([0, 0, 0, 0, 1, 1, 1, 1, 2]))
    with pytest.raises(DataError, match="class '2' has 1 of 9"):
        prepare(make_params("npz", str(npz)), tmp_path / "out")


def test_main_prints_summary(tmp_path, capsys):
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["data"] |= {"dataset": "digits", "max_train_samples": 100, "dev_fraction": 0.2}
    manifest = prepare_stage.main(params, str(tmp_path / "out"))
    text = capsys.readouterr().out
    assert "digits" in text and "train 80" in text and "dev 20" in text and str(tmp_path / "out") in text
    assert manifest["splits"]["train"]["count"] == 80


def test_failed_prepare_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare(make_params(max_train_samples=100, dev_fraction=0.2), out)
    before = snapshot(out)
    bad = make_npz(tmp_path / "bad.npz", y_train=np.arange(39) % 4)
    with pytest.raises(DataError):
        prepare(make_params("npz", str(bad)), out)
    with pytest.raises(DataError):
        prepare(make_params("cifar10", str(write_cifar(tmp_path / "c.tar.gz"))), out)

    def broken_write_json(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_stage, "write_json", broken_write_json)  # fails after the temp dir is filled
    with pytest.raises(OSError, match="disk full"):
        prepare(make_params(), out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "c.tar.gz", "prepared"]


def test_output_stranded_by_a_kill_between_the_renames_is_back_even_when_the_next_prepare_fails(tmp_path):
    out = tmp_path / "prepared"
    prepare(make_params(max_train_samples=100, dev_fraction=0.2), out)
    before = snapshot(out)
    dead = subprocess.Popen(["true"])
    dead.wait()  # the pid of the killed prepare: no process holds it now
    out.rename(tmp_path / f".prepared.old-{dead.pid}.tmp")  # where kill -9 between the renames leaves it
    bad = make_npz(tmp_path / "bad.npz", y_train=np.arange(39) % 4)
    with pytest.raises(DataError):
        prepare(make_params("npz", str(bad)), out)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "prepared"]


# -- the worker processes ------------------------------------------------------------------------------------------

def folder_params(root: Path, workers: int, **data) -> dict:
    params = make_params("folder", str(root), 0.2)
    params["data"] |= {"workers": workers, **data}
    return params


@pytest.fixture
def new_children():
    """The worker processes started since the test began (this process's Process objects, alive)."""
    before = set(multiprocessing.active_children())
    return lambda: set(multiprocessing.active_children()) - before


@pytest.mark.parametrize("n", [1, 2, 3])
def test_workers_return_results_in_order_holding_at_most_two_tasks_each(n, new_children):
    taken = []

    def tasks():
        for i in range(25):
            taken.append(i)
            yield (i, 2)

    with Workers(n) as workers:
        for consumed, result in enumerate(workers.ordered(pow, tasks()), 1):
            assert result == (consumed - 1) ** 2
            assert len(taken) - consumed <= 2 * n  # given to a worker and not consumed yet: the memory bound
            assert len(new_children()) == (n if n > 1 else 0)  # one: in this process
    assert taken == list(range(25)) and not new_children()


def test_a_task_error_comes_back_as_itself_and_a_dead_worker_is_one_line_not_a_hang(new_children):
    with Workers(2) as workers:
        results = workers.ordered(int, [("1",), ("x",), ("3",)])
        assert next(results) == 1
        with pytest.raises(ValueError, match="'x'"):
            next(results)
    with Workers(2) as workers, pytest.raises(ImgclfError, match=r"worker process died \(exit code 3\); out of memory"):
        list(workers.ordered(os._exit, [(3,)]))
    assert not new_children()


def test_a_bad_image_stops_two_workers_in_one_line_leaving_no_process_and_the_old_output(tmp_path, new_children):
    root, out = make_folder(tmp_path / "imgs", n_train=30), tmp_path / "prepared"
    prepare(folder_params(root, 2), out)
    before = snapshot(out)
    bad = root / "train" / "frog" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=f"^{bad}: unreadable or truncated image") as error:
        prepare(folder_params(root, 2), out)
    assert "\n" not in str(error.value) and not new_children()
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "prepared"]


def linked_folder(root: Path, per_class: int, size: int, distinct: int = 5) -> Path:
    """`per_class` images per class, hard links to `distinct` noise PNGs: a large set made in no time."""
    for name in ("a", "b", "c"):
        originals = [save_image(root / "train" / name / f"{i}.png", size=(size, size)) for i in range(distinct)]
        for i in range(distinct, per_class):
            os.link(originals[i % distinct], root / "train" / name / f"{i}.png")
    return root


def test_memory_is_bounded_by_the_chunk_size_not_the_data_set(tmp_path, monkeypatch):
    """What this process allocates (tracemalloc sees NumPy's arrays too) stays a few chunks: only the list of
    files grows with the data set, by ~600 bytes a file against the 27,648 of a 96 px image."""
    import sklearn.model_selection  # noqa: F401  (imported by the first split: not memory the data set takes)

    monkeypatch.setattr(folder, "CHUNK_BYTES", 4 * 96 * 96 * 3)
    peaks, x_train = {}, {}
    for per_class in (100, 400):
        root = linked_folder(tmp_path / f"images{per_class}", per_class, 96)
        tracemalloc.start()
        try:
            prepare(folder_params(root, 2, image_size=96), tmp_path / f"out{per_class}")
            peaks[per_class] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        x_train[per_class] = (tmp_path / f"out{per_class}" / "x_train.npy").stat().st_size
    assert x_train[400] > 25e6 and peaks[400] < x_train[400] / 8, (peaks, x_train)  # it was more than x_train
    assert peaks[400] - peaks[100] < (x_train[400] - x_train[100]) / 10, (peaks, x_train)  # not with the data


def test_a_full_disk_fails_before_any_decoding_and_no_preallocation_writes_the_same_bytes(tmp_path, monkeypatch):
    root, out = make_folder(tmp_path / "imgs"), tmp_path / "prepared"
    prepare(folder_params(root, 1), out)
    before, decoded, decode = snapshot(out), [], folder._decode_chunk
    monkeypatch.setattr(folder, "_decode_chunk", lambda *task: decoded.append(task) or decode(*task))

    def refuse(code):
        def posix_fallocate(fd, offset, size):
            raise OSError(code, os.strerror(code))
        return posix_fallocate

    monkeypatch.setattr(os, "posix_fallocate", refuse(errno.ENOSPC))
    with pytest.raises(WriteError, match=f"^{out}: could not be written \\(No space left on device"):
        prepare(folder_params(root, 1, dev_fraction=0.3), out)
    assert decoded == [] and snapshot(out) == before
    monkeypatch.setattr(os, "posix_fallocate", refuse(errno.EOPNOTSUPP))  # a file system without it: silently
    shutil.rmtree(out)
    prepare(folder_params(root, 1), out)
    assert decoded and snapshot(out) == before


def children(pid: int) -> set[int]:
    """The processes `pid` started and that still exist (its threads' children too)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def running(pid: int) -> bool:
    """Whether `pid` exists and is no zombie (a dead process not reaped yet holds nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signal_mid_prepare_leaves_no_worker_and_no_half_written_output(tmp_path, signum):
    """Ctrl-C (SIGINT to the whole process group), SIGTERM (DVC, kill) or SIGKILL while two workers decode."""
    ws = tmp_path / "ws"
    (ws / "data" / "prepared").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    (ws / "data" / "prepared" / "manifest.json").write_text("the previous output")
    images = linked_folder(tmp_path / "images", 400, 1024, distinct=1)  # ~30 ms an image: 4 s a task
    cmd = ["imgclf", "-S", "data.dataset=folder", "-S", f"data.path={images}", "-S", "data.workers=2", "prepare"]
    with reaped(ws):  # should this fail: no process left behind by the test itself
        proc = subprocess.Popen(cmd, cwd=ws, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            workers = wait_until(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 60, "two workers")
            time.sleep(0.5)  # decoding under way
            (os.killpg if signum == signal.SIGINT else os.kill)(proc.pid, signum)
            proc.wait(timeout=60)
            wait_until(lambda: not any(map(running, workers)), 2, "the workers to end with their parent")
            stderr = proc.stderr.read()  # only now: workers alive would hold the pipe open
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close(), proc.stderr.close()
    assert (ws / "data" / "prepared" / "manifest.json").read_text() == "the previous output"
    if signum != signal.SIGKILL:
        assert proc.returncode == 130 and stderr.strip() == "imgclf prepare: interrupted", stderr
        assert os.listdir(ws / "data") == ["prepared"]  # and no temp folder left behind
