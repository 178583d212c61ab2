"""Runs left RUNNING by a process that died (kill -9): each run records its writer (host, pid namespace, pid),
and a run whose writer of this machine is gone is ended KILLED; a run reopened is claimed first."""

from __future__ import annotations

import os
import socket

import mlflow

from imgclf.process import pid_alive


def owner_tags() -> dict[str, str]:
    """The process writing a run, so that a later run can tell a run left RUNNING by a kill -9 from a live one."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # pids name the same process only within one namespace
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "pid_namespace": namespace, "pid": str(os.getpid())}


def _process_gone(pid: str) -> bool:
    """Whether no process `pid` exists on this machine (False when unsure: never end a live run)."""
    return pid.isdigit() and not pid_alive(int(pid))


def end_if_orphan(client, run, me: dict[str, str]) -> None:
    """End `run` KILLED if it is RUNNING although the process of this machine that wrote it is gone (a kill -9).

    Only when that process is known to be dead: a queued experiment training beside this one, or a run of
    another machine or pid namespace, stays RUNNING.
    """
    tags = run.data.tags
    if run.info.status == "RUNNING" and all(tags.get(k) == me[k] for k in ("host", "pid_namespace")) \
            and _process_gone(tags.get("pid", "")):
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"MLflow run {run.info.run_id} ({run.info.run_name}) was left RUNNING by process {tags['pid']}, "
              "which is gone: ended it KILLED")


def claim(run_id: str) -> None:
    """Record this process as the run's writer before reopening it, so no other process takes it for an orphan."""
    from mlflow.entities import RunTag

    mlflow.tracking.MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])
