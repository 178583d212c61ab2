"""The team server's PostgreSQL: its programs, the account it runs as (never root), the cluster made on first use
with a private password, starting it on 127.0.0.1 and MLflow's database in it."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from imgclf.process import last_line
from imgclf.team.supervise import Service, TeamDir, TeamError, wait_for


PG_USER = "imgclf"       # the cluster's superuser: only the MLflow server logs in, with the password in DIR


DATABASE = "mlflow"


PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)   # Debian's postgresql-15 (scripts/system_deps.sh installs it)


PG_START_SECONDS = 60.0


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
        reason = last_line(done.stderr) or "no output"
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


def ensure_database(port: int, password: str, name: str = DATABASE) -> None:
    """Create one of MLflow's databases on first use (MLflow creates its tables in it): the runs' (DATABASE),
    the users' (auth.AUTH_DATABASE)."""
    conn = pg_connect(port, password)
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {name}")  # our constant, never user input
    finally:
        conn.close()
