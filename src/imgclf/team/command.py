"""Team mode: one MLflow tracking server on PostgreSQL, started and stopped in one command (docs/team.md).

`imgclf-team serve --dir DIR` keeps everything in DIR: `postgres/` (the cluster, made by initdb on first use),
`artifacts/` (every run's artifacts and models, served by the MLflow server), `postgres.password` and the two
logs. It starts PostgreSQL on 127.0.0.1 (only the MLflow server talks to it), then `mlflow server` on
`--host`/`--port`, prints the MLFLOW_TRACKING_URI to export, and on Ctrl-C or SIGTERM stops the MLflow server,
then PostgreSQL (a fast shutdown: every committed run is on disk). A second start reuses DIR.

PostgreSQL refuses to run as root: under root it runs as the `postgres` user, which must be able to reach DIR.
`imgclf-team move-in` (move_in.py) copies a clone's local runs into the server.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import requests

from imgclf.errors import ImgclfError, exit_code, install_handlers
from imgclf.process import leave

# move-in imports TensorFlow (through imgclf.tracking.tracker), whose C++ start-up chatter hides our one-line errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PG_USER = "imgclf"       # the cluster's superuser: only the MLflow server logs in, with the password in DIR
DATABASE = "mlflow"
PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)   # Debian's postgresql-15 (scripts/system_deps.sh installs it)
STOP_SECONDS = 30.0      # how long each service gets to stop before it is forced
MLFLOW_START_SECONDS = 300.0  # a first start runs MLflow's schema migrations: room for a loaded machine
PG_START_SECONDS = 60.0


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


def pg_bin() -> Path:
    """The folder of PostgreSQL's server programs: IMGCLF_PG_BIN, Debian's postgresql-15, or initdb on PATH."""
    candidates = [os.environ.get("IMGCLF_PG_BIN", ""), *PG_BIN_DIRS, os.path.dirname(shutil.which("initdb") or "")]
    for folder in filter(None, candidates):
        if (Path(folder) / "postgres").is_file() and (Path(folder) / "initdb").is_file():
            return Path(folder)
    raise TeamError(f"PostgreSQL's server programs (initdb, postgres) are not in {', '.join(PG_BIN_DIRS)}; run "
                    "`make system-deps` as root (apt-get install postgresql-15) or set IMGCLF_PG_BIN")


def server_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: `postgres` under root (it refuses root), else None (this user)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise TeamError("PostgreSQL refuses to run as root and there is no `postgres` user; run `make system-deps` "
                        "(its postgresql-15 package creates it) or start the team server as another user") from None


def as_account(account: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run a child as `account` (with its group only), or as this user."""
    return {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


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
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by this user only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def ensure_cluster(team: TeamDir, account: pwd.struct_passwd | None) -> bool:
    """Create the PostgreSQL cluster with a fresh password on first use (True); reuse it after (False)."""
    if (team.pgdata / "PG_VERSION").is_file():
        return False
    if team.pgdata.is_dir() and any(team.pgdata.iterdir()):
        raise TeamError(f"{team.pgdata} holds files but no PostgreSQL cluster; empty it or pick another --dir")
    team.pgdata.mkdir(parents=True, mode=0o700, exist_ok=True)
    if account is not None:
        os.chown(team.pgdata, account.pw_uid, account.pw_gid)
        reachable = subprocess.run(["test", "-w", str(team.pgdata)], **as_account(account)).returncode == 0
        if not reachable:
            raise TeamError(f"the postgres user cannot reach {team.pgdata} (PostgreSQL refuses to run as root, so it "
                            "runs as postgres); pick a --dir every parent of which others may enter, e.g. "
                            "/srv/imgclf-team")
    password = secrets.token_urlsafe(24)
    write_private(team.password_file, password)
    # initdb reads the password from a file its account can read: a private temp file, gone right after.
    fd, pwfile = tempfile.mkstemp(prefix="imgclf-pw-")
    try:
        os.write(fd, password.encode())
        os.close(fd)
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        cmd = [str(pg_bin() / "initdb"), "-D", str(team.pgdata), "-U", PG_USER, f"--pwfile={pwfile}",
               "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=team.pgdata, **as_account(account))
    finally:
        os.unlink(pwfile)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TeamError(f"initdb {team.pgdata} failed ({reason}); fix that and start again")
    return True


def check_not_running(team: TeamDir) -> None:
    """Refuse a folder whose PostgreSQL still runs: another team server, or one killed by kill -9 left it."""
    try:
        pid = int((team.pgdata / "postmaster.pid").read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return  # no pid file, or a stale one: PostgreSQL removes that itself
    if comm.startswith("postgres"):
        raise TeamError(f"PostgreSQL pid {pid} still runs on {team.pgdata} (another team server uses this --dir, or "
                        f"one was killed with kill -9); stop it with `kill -INT {pid}` or pick another --dir")


def pg_connect(port: int, password: str, database: str = "postgres"):
    """A connection to the team's PostgreSQL on 127.0.0.1."""
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, password=password, dbname=database,
                            connect_timeout=3)


def start_postgres(team: TeamDir, account: pwd.struct_passwd | None, port: int, password: str) -> Service:
    """Start PostgreSQL on 127.0.0.1:`port` in its own session (Ctrl-C reaches only us: we stop it in order)."""
    import psycopg2

    check_not_running(team)
    cmd = [str(pg_bin() / "postgres"), "-D", str(team.pgdata), "-c", "listen_addresses=127.0.0.1",
           "-c", f"port={port}", "-c", "unix_socket_directories="]  # TCP only: no socket folder to own
    with open(team.pg_log, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=team.pgdata, start_new_session=True,
                                **as_account(account))
    # SIGINT: fast shutdown (open sessions end, all committed data is written); SIGQUIT: immediate, if stuck.
    service = Service("PostgreSQL", proc, team.pg_log, signal.SIGINT, signal.SIGQUIT, group=False)

    def ready() -> bool:
        try:
            pg_connect(port, password).close()
            return True
        except psycopg2.OperationalError:
            return False

    wait_for(service, ready, PG_START_SECONDS)
    return service


def ensure_database(port: int, password: str) -> None:
    """Create MLflow's database on first use (MLflow creates its tables in it)."""
    conn = pg_connect(port, password)
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        conn.close()


WILDCARDS = ("0.0.0.0", "::", "")


def http_uri(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def local_uri(host: str, port: int) -> str:
    """The URI that reaches a server listening on `host` from this machine."""
    return http_uri({"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port)


def public_uri(host: str, port: int) -> str:
    """The tracking URI to hand out: this machine's name when the server listens on every interface."""
    return http_uri(socket.gethostname() if host in WILDCARDS else host, port)


def start_mlflow(team: TeamDir, args: argparse.Namespace, pg_port: int, password: str) -> Service:
    """Start `mlflow server` on the PostgreSQL store in its own session; wait until /health answers."""
    env = dict(os.environ, PGPASSWORD=password)  # libpq reads it: the password stays out of `ps` and the logs
    # MLflow's job runner (GenAI jobs: scorers, prompt optimisation) adds two processes training runs never use.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{pg_port}/{DATABASE}",
           "--artifacts-destination", str(team.artifacts), "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers), *args.mlflow_args]
    with open(team.mlflow_log, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    service = Service("MLflow server", proc, team.mlflow_log, signal.SIGTERM, signal.SIGKILL, group=True)
    url = f"{local_uri(args.host, args.port)}/health"

    def healthy() -> bool:
        try:
            return requests.get(url, timeout=2).ok
        except requests.RequestException:
            return False

    wait_for(service, healthy, MLFLOW_START_SECONDS)
    return service


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


def announce(team: TeamDir, args: argparse.Namespace, pg_port: int, created: bool, out: IO[str]) -> None:
    """Tell the user what runs where and the URI to export."""
    cluster = "created" if created else "reused"
    print(f"imgclf-team: PostgreSQL ({cluster} in {team.pgdata}, on 127.0.0.1:{pg_port}) and the MLflow server "
          f"(artifacts in {team.artifacts}) are up; logs: {team.pg_log}, {team.mlflow_log}", file=out)
    print(f"imgclf-team: on every machine of the team (Ctrl-C or SIGTERM here stops both):\n"
          f"export MLFLOW_TRACKING_URI={public_uri(args.host, args.port)}", file=out, flush=True)


def warn_if_exposed(host: str) -> None:
    """The MLflow server has no authentication: say so when it listens beyond this machine."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        print(f"imgclf-team: warning: --host {host} serves MLflow WITHOUT authentication: anyone who reaches this "
              "machine's port can read, change and delete every run; keep it on a trusted network or behind an "
              "authenticating proxy", file=sys.stderr)


def serve(args: argparse.Namespace) -> int:
    """Start PostgreSQL and the MLflow server, run until a signal or until one of them dies, stop both."""
    team = TeamDir(Path(args.dir).resolve())
    warn_if_exposed(args.host)
    check_port(args.host, args.port, "--port")
    pg_port = args.pg_port or free_port()
    check_port("127.0.0.1", pg_port, "--pg-port")
    account = server_account()
    team.root.mkdir(parents=True, exist_ok=True)
    created = ensure_cluster(team, account)
    password = team.password_file.read_text().strip()
    services: list[Service] = []
    install_handlers()  # SIGTERM like Ctrl-C: both end in the orderly stop below
    try:
        services.append(start_postgres(team, account, pg_port, password))
        ensure_database(pg_port, password)
        services.insert(0, start_mlflow(team, args, pg_port, password))  # stopped first: it writes to PostgreSQL
        announce(team, args, pg_port, created, sys.stdout)
        while all(s.proc.poll() is None for s in services):
            time.sleep(0.5)
        dead = next(s for s in services if s.proc.poll() is not None)
        raise TeamError(f"{dead.name} exited with code {dead.proc.returncode} ({last_line(dead.log)}); see "
                        f"{dead.log}; the other was stopped")
    except KeyboardInterrupt:
        print("imgclf-team: stopping the MLflow server, then PostgreSQL", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the stop short and leave PostgreSQL running without us.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        for service in services:
            stop_service(service)
        if services:
            print(f"imgclf-team: stopped; data kept in {team.root}", flush=True)


def move_in(args: argparse.Namespace) -> int:
    from imgclf.team import move_in as mover

    return mover.main(args.source, args.target, args.experiment)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclf-team", description="Team mode: a shared MLflow server on "
                                     "PostgreSQL (docs/team.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="start PostgreSQL and the MLflow server; Ctrl-C or SIGTERM stops both")
    srv.add_argument("--dir", default="team-server", help="folder of the database, artifacts and logs "
                     "(default: ./team-server; reused on the next start)")
    srv.add_argument("--host", default="127.0.0.1", help="interface the MLflow server listens on (default "
                     "127.0.0.1; 0.0.0.0 for the team's machines: no authentication, see docs/team.md)")
    srv.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default 5000)")
    srv.add_argument("--pg-port", type=int, default=0, help="PostgreSQL's port on 127.0.0.1 (default: a free one)")
    srv.add_argument("--workers", type=int, default=4, help="the MLflow server's worker processes (default 4)")
    srv.add_argument("mlflow_args", nargs="*", help="after --: more `mlflow server` options, e.g. "
                     "-- --allowed-hosts mlflow.lab:5000")
    srv.set_defaults(func=serve)
    mov = sub.add_parser("move-in", help="copy the runs of a local MLflow store into the team server")
    mov.add_argument("--from", dest="source", default="sqlite:///mlflow.db",
                     help="the store to copy from (default: sqlite:///mlflow.db, this clone's)")
    mov.add_argument("--to", dest="target", default=os.environ.get("MLFLOW_TRACKING_URI"),
                     help="the team server (default: MLFLOW_TRACKING_URI)")
    mov.add_argument("--experiment", action="append", default=[], help="only this experiment (repeatable)")
    mov.set_defaults(func=move_in)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`imgclf-team`: one line and exit 2 on a user-facing error, never a traceback."""
    args = build_parser().parse_args(argv)
    return exit_code(f"imgclf-team {args.command}", lambda: args.func(args) or 0)


def console() -> int:
    """The `imgclf-team` console script (pyproject.toml): main(), then a quick exit."""
    return leave(main())


if __name__ == "__main__":
    sys.exit(console())
