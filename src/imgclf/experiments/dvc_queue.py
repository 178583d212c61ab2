"""DVC's experiment queue, started and watched by us instead of by `dvc exp run --run-all`.

`--run-all` waits for each queued task to start, then to finish, with no timeout. A task that fails
inside DVC's own setup (before its pipeline runs) or a queue worker that dies leaves it waiting
forever (treeverse/dvc#10398 and #10428, both open); it hung our CI for 15 minutes. Here the
workers come from `dvc queue start` and the queue is read through DVC's own status every few
seconds: each experiment's log is streamed under its label, an experiment that failed in DVC's
setup is queued once more, dead workers are restarted, and nothing is waited on forever.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf import process
from imgclf.errors import ImgclfError
from imgclf.files.atomic import write_json

POLL_SECONDS = 2.0      # how often DVC's queue status is read
GRACE_SECONDS = 15.0    # how long "work left but no live worker" may last before we restart or give up
COLLECT_SECONDS = 120.0  # an experiment ended this long ago and DVC still says Running: lost
UNREADABLE_SECONDS = 120.0  # how long DVC's queue may stay unreadable (polls x POLL_SECONDS) before we give up
WORKER_RESTARTS = 3     # `dvc queue start`s allowed after the first one, when all workers died with work left
SETUP_RETRIES = 1       # re-queues of an experiment that failed before its pipeline started


@dataclass
class Job:
    """One experiment: its label, its `dvc exp run --queue` command, and what we know of it so far."""

    label: str
    args: list[str]
    name: str = ""                   # DVC's experiment name, from `dvc exp run --queue`
    rev: str = ""                    # DVC's stash rev, once the queue lists it
    status: str = "Queued"           # DVC's Queued / Running / Success / Failed, or our Lost
    retries: int = 0
    log_offset: int = 0              # bytes of the experiment's log already printed
    ended_at: float | None = None    # when its process was first seen ended while DVC said Running

    @property
    def unfinished(self) -> bool:
        return self.status in ("Queued", "Running")


def dvc_command() -> str:
    """The dvc next to this Python (the project's .venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def last_line(proc: subprocess.CompletedProcess) -> str:
    return process.last_line(proc.stderr or "") or process.last_line(proc.stdout or "") or "no output"


# What a queued experiment's code and config can come from. DVC copies the workspace's changes to tracked and
# staged files into the experiment, never untracked ones (treeverse/dvc#5029): a new family or source file
# would be missing from it, silently.
QUEUED_INPUTS = ("src", "dvc.yaml", "params.yaml")


def refuse_untracked_inputs(root: Path) -> None:
    """One line naming the untracked files a queued experiment would run without, and the fix."""
    proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", *QUEUED_INPUTS], cwd=root,
                          capture_output=True, text=True)
    untracked = proc.stdout.split()
    if untracked:
        shown = ", ".join(untracked[:5]) + (f" and {len(untracked) - 5} more" if len(untracked) > 5 else "")
        raise ImgclfError(f"{shown}: not tracked by git, so DVC's queue would run the experiments without them; "
                          f"`git add` them (staged files go with a queued experiment) or commit them, then rerun")


def enqueue(root: Path, job: Job) -> None:
    """`dvc exp run --queue ...`; remembers the name DVC gives the experiment."""
    proc = subprocess.run(job.args, cwd=root, capture_output=True, text=True)
    found = re.search(r"Queued experiment '([^']+)'", proc.stdout)
    if proc.returncode or not found:
        raise ImgclfError(f"dvc could not queue {job.label}: {last_line(proc)}; see `dvc queue status`")
    job.name, job.rev, job.status, job.log_offset, job.ended_at = found.group(1), "", "Queued", 0, None


def start_workers(root: Path, count: int) -> None:
    """`dvc queue start`, tried twice: its own worker inspection can trip over a half-written broker file."""
    for _ in range(2):
        proc = subprocess.run([dvc_command(), "queue", "start", "--jobs", str(count)], cwd=root,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return
        time.sleep(1)
    raise ImgclfError(f"`dvc queue start` failed: {last_line(proc)}; see `dvc queue status`")


def process_state(info_file: Path) -> str | None:
    """A dvc-task process from its info file: None (no file yet), "running", "ended" (its exit code is
    recorded) or "died" (gone with no exit code: whatever was waiting on it, a queue worker, died too)."""
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):  # absent, or being rewritten this instant
        return None
    if info.get("returncode") is not None:
        return "ended"
    return "running" if process.pid_alive(int(info["pid"])) else "died"


class DvcQueue:
    """Everything this module reads of DVC's internals, in one place: the queue's status and the files
    dvc-task keeps per process. DVC documents none of it (as DVC 3.67 has it); the constructor fails
    with one line naming the DVC version if it moved."""

    def __init__(self, root: Path):
        import dvc

        try:
            from dvc.repo.experiments.queue.celery import LocalCeleryQueue
            from dvc.repo.experiments.utils import EXEC_PID_DIR, EXEC_TMP_DIR

            assert callable(LocalCeleryQueue.status)
            celery_dir = LocalCeleryQueue.CELERY_DIR
        except (ImportError, AttributeError, AssertionError):
            raise ImgclfError(
                f"imgclf experiments reads DVC's experiment queue internals (written for DVC 3.67), which DVC "
                f"{dvc.__version__} moved; queue by hand (`dvc exp run --queue`, `dvc queue start`) or install "
                "the DVC version requirements.lock pins"
            ) from None
        self.root = root
        self.exps = root / ".dvc" / "tmp" / EXEC_TMP_DIR
        self.runs, self.celery = self.exps / EXEC_PID_DIR, self.exps / celery_dir

    def status(self) -> dict[str, tuple[str, str]] | None:
        """{experiment name: (DVC status, stash rev)} as `dvc queue status` lists them, without its worker
        inspection; None when the queue could not be read this time (a worker was rewriting it)."""
        from dvc.repo import Repo

        try:
            with Repo(str(self.root)) as repo:
                return {e["name"]: (e["status"], e["rev"]) for e in repo.experiments.celery_queue.status()}
        except Exception as exc:  # noqa: BLE001 - retried at the next poll, bounded by the caller
            print(f"could not read DVC's queue this time ({type(exc).__name__}: {exc}); retrying", file=sys.stderr)
            return None

    def workers_alive(self) -> bool:
        return any(process_state(f) == "running" for f in self.celery.glob("dvc-exp-worker-*.json"))

    def run_file(self, job: Job, suffix: str) -> Path:
        """A file dvc-task keeps for the experiment's process: `.out` (its log) or `.json` (its process info)."""
        return self.runs / job.rev / f"{job.rev}{suffix}"


def stream_log(queue: DvcQueue, job: Job, final: bool = False) -> None:
    """Print the experiment's new complete log lines (all of it when `final`), each under its label."""
    log = queue.run_file(job, ".out")
    if not job.rev or not log.is_file():
        return
    with log.open("rb") as fh:
        fh.seek(job.log_offset)
        chunk = fh.read()
    end = len(chunk) if final else chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode(errors="replace").splitlines():
        print(f"[{job.label}] {line}")
    sys.stdout.flush()
    job.log_offset += end


def update(queue: DvcQueue, job: Job, state: tuple[str, str] | None, now: float) -> None:
    """Move one unfinished job along from DVC's view of it."""
    status, job.rev = state or (job.status, job.rev)
    stream_log(queue, job, final=status in ("Success", "Failed"))
    if status == "Failed" and not queue.run_file(job, ".out").exists() and job.retries < SETUP_RETRIES:
        print(f"[{job.label}] failed in DVC's setup, before its pipeline ran; queueing it again", flush=True)
        job.retries += 1
        enqueue(queue.root, job)
        return
    state_now = process_state(queue.run_file(job, ".json")) if status == "Running" else None
    if state_now in ("ended", "died"):
        job.ended_at = job.ended_at or now
        # "ended": DVC is collecting the results. "died": the worker waiting on it died, so nobody will.
        if now - job.ended_at > (COLLECT_SECONDS if state_now == "ended" else GRACE_SECONDS):
            status = "Lost"
    if status != job.status and status in ("Success", "Failed", "Lost"):
        print(f"[{job.label}] {status.lower()} (DVC experiment {job.name})", flush=True)
    job.status = status


def watch(queue: DvcQueue, jobs: list[Job], workers: int) -> list[Job]:
    """Run the queue until every job succeeded, failed or was lost; returns those that did not succeed."""
    root = queue.root
    start_workers(root, workers)
    restarts, no_worker_since, unreadable = 0, None, 0
    while unfinished := [j for j in jobs if j.unfinished]:
        time.sleep(POLL_SECONDS)
        states, now = queue.status(), time.monotonic()
        unreadable = 0 if states is not None else unreadable + 1
        if states is None:
            if unreadable * POLL_SECONDS > UNREADABLE_SECONDS:
                raise ImgclfError("DVC's experiment queue stayed unreadable; see `dvc queue status`")
            continue
        for job in unfinished:
            update(queue, job, states.get(job.name), now)
        if queue.workers_alive() or not any(j.unfinished for j in jobs):
            no_worker_since = None
            continue
        no_worker_since = no_worker_since or now
        if now - no_worker_since < GRACE_SECONDS:
            continue
        waiting = [j for j in jobs if j.status == "Queued"]
        if waiting and restarts < WORKER_RESTARTS:
            print(f"no DVC queue worker is alive and {len(waiting)} experiment(s) wait; starting workers again",
                  flush=True)
            restarts, no_worker_since = restarts + 1, None
            start_workers(root, workers)
            continue
        for job in [j for j in jobs if j.unfinished]:
            print(f"[{job.label}] lost: no DVC queue worker is left to run it", flush=True)
            job.status = "Lost"
    return [j for j in jobs if j.status != "Success"]


def journal(root: Path) -> Path:
    """Where `run` keeps the DVC names of the jobs it queued until it has watched them all (DVC's tmp folder)."""
    return root / ".dvc" / "tmp" / "imgclf-experiments.json"


def adopt(root: Path, jobs: list[Job]) -> int:
    """Give back their DVC names to the jobs an earlier `imgclf experiments` queued but did not see end (killed,
    even by kill -9: its queue workers go on), so they are watched again instead of queued and run twice.

    The workspace lock (workspace.py) guarantees that earlier run is gone. Returns how many jobs were adopted.
    """
    try:
        saved = json.loads(journal(root).read_text())["jobs"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    names = {(j["label"], tuple(j["args"])): j["name"] for j in saved}
    for job in jobs:
        job.name = names.get((job.label, tuple(job.args)), "")
    return sum(bool(job.name) for job in jobs)


def record(root: Path, jobs: list[Job]) -> None:
    jobs_queued = [{"label": j.label, "args": j.args, "name": j.name} for j in jobs if j.name]
    write_json(journal(root), {"pid": os.getpid(), "jobs": jobs_queued})


def run(root: Path, jobs: list[Job], workers: int) -> list[Job]:
    """Queue every job (but those adopted from a killed earlier run), run them with `workers` DVC queue workers;
    returns the jobs that did not succeed."""
    queue = DvcQueue(root)
    adopted = adopt(root, jobs)
    if adopted:
        print(f"{adopted} experiment(s) were queued by an earlier `imgclf experiments` that did not see them end: "
              "watching them instead of queueing them again", flush=True)
    for job in [j for j in jobs if not j.name]:
        enqueue(root, job)
        record(root, jobs)  # at once: a kill -9 before the next one still leaves this one adoptable
    print(f"Queued {len(jobs) - adopted} experiments; running them with {workers} worker(s)", flush=True)
    try:
        failed = watch(queue, jobs, workers)
        journal(root).unlink(missing_ok=True)  # every job ended: a later run queues the grid afresh
        return failed
    except KeyboardInterrupt:
        print("imgclf experiments: stopped watching; queued experiments go on in the background: "
              "`dvc queue status`, `dvc queue kill`", file=sys.stderr)
        raise
