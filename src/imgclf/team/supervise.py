"""The child processes of a team server: the folder they keep (TeamDir), each one as a Service (how it stops
cleanly and by force, where it logs), waiting until it is ready, stopping it, and the ports they listen on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf import process
from imgclf.errors import ImgclfError


STOP_SECONDS = 30.0      # how long each service gets to stop before it is forced


class TeamError(ImgclfError):
    """The team server cannot start or keep running: one line naming the culprit and the fix."""


@dataclass(frozen=True)
class TeamDir:
    """The files of one team server, all under `root`."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def password_file(self) -> Path:
        return self.root / "postgres.password"

    @property
    def admin_password_file(self) -> Path:
        return self.root / "admin.password"

    @property
    def secret_key_file(self) -> Path:
        return self.root / "flask.secret"

    @property
    def auth_config(self) -> Path:
        return self.root / "basic_auth.ini"

    @property
    def members(self) -> Path:
        return self.root / "members"

    @property
    def pg_log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def mlflow_log(self) -> Path:
        return self.root / "mlflow.log"


@dataclass
class Service:
    """A child process, how it stops cleanly (`stop`) and by force (`force`), and where it logs."""

    name: str
    proc: subprocess.Popen
    log: Path
    stop: signal.Signals
    force: signal.Signals
    group: bool  # signal its whole process group (the MLflow server's uvicorn workers), not just the process


def check_port(host: str, port: int, flag: str) -> None:
    """Fail in one line when `host:port` cannot be listened on (taken, or not this machine's address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # As the servers bind: connections of a server stopped a moment ago (TIME_WAIT) must not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TeamError(f"cannot listen on {host}:{port} ({exc.strerror}): another server has it or the address "
                            f"is not this machine's; stop that server or pick another {flag}") from None


def free_port() -> int:
    """A port of 127.0.0.1 nobody listens on now (PostgreSQL's: only the MLflow server connects to it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for one-line errors."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no log"
    return process.last_line(text)[:300] or "no output"


def wait_for(service: Service, ready, timeout: float) -> None:
    """Poll `ready()` until it holds; one line naming the service and its log when it dies or never gets ready."""
    deadline = time.monotonic() + timeout
    while not ready():
        if service.proc.poll() is not None:
            raise TeamError(f"{service.name} exited with code {service.proc.returncode} while starting "
                            f"({last_line(service.log)}); see {service.log}")
        if time.monotonic() > deadline:
            raise TeamError(f"{service.name} did not get ready in {timeout:.0f} s; see {service.log}")
        time.sleep(0.3)


def stop_service(service: Service) -> None:
    """Signal `service` to stop and wait; force it after STOP_SECONDS."""
    send = os.killpg if service.group else os.kill
    for sig in (service.stop, service.force):
        if service.proc.poll() is not None:
            return
        try:
            send(service.proc.pid, sig)
            service.proc.wait(STOP_SECONDS)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            print(f"imgclf-team: {service.name} did not stop in {STOP_SECONDS:.0f} s: sending {sig.name}",
                  file=sys.stderr)
    service.proc.wait()
