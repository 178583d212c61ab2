"""The queue watcher's judgement of processes, logs and stuck experiments, on real files and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import BIN, wait_until
from imgclf.errors import ImgclfError
from imgclf.experiments import dvc_queue as exp_queue
from imgclf.experiments.dvc_queue import DvcQueue, Job, process_state, stream_log, update
from imgclf.process import pid_alive


def info_file(path, pid: int, returncode: int | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "stdout": None, "returncode": returncode}))
    return path


def exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_process_state_from_dvc_task_info_files(tmp_path):
    assert process_state(tmp_path / "absent.json") is None
    (tmp_path / "torn.json").write_text('{"pid": 12')
    assert process_state(tmp_path / "torn.json") is None
    assert process_state(info_file(tmp_path / "me.json", os.getpid())) == "running"
    assert process_state(info_file(tmp_path / "done.json", exited_pid(), returncode=0)) == "ended"
    assert process_state(info_file(tmp_path / "gone.json", exited_pid())) == "died"


def test_an_unreaped_zombie_is_not_running():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: not pid_alive(proc.pid), 30, "the child to exit")  # exited, not waited for: a zombie
        os.kill(proc.pid, 0)  # the pid still exists, so kill(0) alone would call it running
        assert proc.poll() == 0
    finally:
        proc.wait()


def test_log_lines_are_streamed_whole_and_labelled(tmp_path, capsys):
    job = Job("shallow seed 1", [], name="tall-fig", rev="abc123")
    log = tmp_path / ".dvc/tmp/exps/run/abc123/abc123.out"
    log.parent.mkdir(parents=True)
    log.write_text("Running stage 'train':\n> imgclf tr")
    stream_log(DvcQueue(tmp_path), job)
    assert capsys.readouterr().out == "[shallow seed 1] Running stage 'train':\n"
    with log.open("a") as fh:
        fh.write("ain\nepoch 1")
    stream_log(DvcQueue(tmp_path), job)
    assert capsys.readouterr().out == "[shallow seed 1] > imgclf train\n"
    stream_log(DvcQueue(tmp_path), job, final=True)
    assert capsys.readouterr().out == "[shallow seed 1] epoch 1\n"


def test_a_running_experiment_whose_worker_died_is_lost_after_the_grace(tmp_path, capsys):
    job = Job("no_512 seed 7", [], name="lean-cat", rev="r1", status="Running")
    info_file(tmp_path / ".dvc/tmp/exps/run/r1/r1.json", exited_pid())  # no exit code: its waiter died
    update(DvcQueue(tmp_path), job, ("Running", "r1"), now=100.0)
    assert job.status == "Running"
    update(DvcQueue(tmp_path), job, ("Running", "r1"), now=100.0 + exp_queue.GRACE_SECONDS + 1)
    assert job.status == "Lost" and "[no_512 seed 7] lost (DVC experiment lean-cat)" in capsys.readouterr().out


def test_a_finished_experiment_gets_time_to_be_collected(tmp_path):
    job = Job("shallow seed 1", [], name="wide-owl", rev="r2", status="Running")
    info_file(tmp_path / ".dvc/tmp/exps/run/r2/r2.json", exited_pid(), returncode=0)
    queue = DvcQueue(tmp_path)
    update(queue, job, ("Running", "r2"), now=0.0)
    update(queue, job, ("Running", "r2"), now=exp_queue.COLLECT_SECONDS - 1)
    assert job.status == "Running"
    update(queue, job, ("Success", "r2"), now=exp_queue.COLLECT_SECONDS + 1)
    assert job.status == "Success"


def test_a_failure_in_dvc_setup_is_queued_once_more_then_reported(repo_copy, capsys):
    args = [str(BIN / "dvc"), "exp", "run", "--queue", "-S", "seed=3"]
    job = Job("report_final seed 3", args)
    exp_queue.enqueue(repo_copy, job)
    first = job.name
    queue = DvcQueue(repo_copy)
    update(queue, job, ("Failed", "no-such-rev"), now=0.0)  # failed with no log: never got past setup
    assert job.status == "Queued" and job.retries == 1 and job.name != first
    assert queue.status()[job.name][0] == "Queued"
    assert "failed in DVC's setup, before its pipeline ran; queueing it again" in capsys.readouterr().out
    update(queue, job, ("Failed", "no-such-rev"), now=1.0)
    assert job.status == "Failed"


def test_dvc_internals_that_moved_are_one_line_naming_the_dvc_version(tmp_path, monkeypatch):
    import dvc
    from dvc.repo.experiments.queue.celery import LocalCeleryQueue

    assert DvcQueue(tmp_path).runs == tmp_path / ".dvc/tmp/exps/run"
    monkeypatch.delattr(LocalCeleryQueue, "CELERY_DIR")
    with pytest.raises(ImgclfError, match=f"DVC {dvc.__version__} moved; queue by hand"):
        DvcQueue(tmp_path)
