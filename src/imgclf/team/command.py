"""Team mode: one MLflow tracking server on PostgreSQL, started and stopped in one command (docs/team.md).

`imgclf-team serve --dir DIR` keeps everything in DIR: `postgres/` (the cluster, made by initdb on first use),
`artifacts/` (every run's artifacts and models, served by the MLflow server), `postgres.password` and the two
logs. It starts PostgreSQL on 127.0.0.1 (only the MLflow server talks to it), then `mlflow server` on
`--host`/`--port`, prints the MLFLOW_TRACKING_URI to export, and on Ctrl-C or SIGTERM stops the MLflow server,
then PostgreSQL (a fast shutdown: every committed run is on disk). A second start reuses DIR.

PostgreSQL refuses to run as root: under root it runs as the `postgres` user, which must be able to reach DIR.
MLflow's basic-auth app guards the server (auth.py): the admin is made on first start, its password in
DIR/admin.password (0600); `imgclf-team user add NAME [--read-only]` adds a member. `imgclf-team move-in`
(move_in.py) copies a clone's local runs into the server. This module is the command line; postgres.py,
mlflow_server.py, auth.py and supervise.py do the work.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

from imgclf.errors import exit_code, install_handlers
from imgclf.process import leave
from imgclf.team.auth import AUTH_DATABASE, add_member
from imgclf.team.mlflow_server import public_uri, start_mlflow, warn_if_exposed
from imgclf.team.postgres import ensure_cluster, ensure_database, server_account, start_postgres
from imgclf.team.supervise import Service, TeamDir, TeamError, check_port, free_port, last_line, stop_service

# move-in imports TensorFlow (through imgclf.tracking.store), whose C++ start-up chatter hides our one-line errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def announce(team: TeamDir, args: argparse.Namespace, pg_port: int, created: bool, out: IO[str]) -> None:
    """Tell the user what runs where and the URI to export."""
    cluster = "created" if created else "reused"
    print(f"imgclf-team: PostgreSQL ({cluster} in {team.pgdata}, on 127.0.0.1:{pg_port}) and the MLflow server "
          f"(artifacts in {team.artifacts}) are up; logs: {team.pg_log}, {team.mlflow_log}", file=out)
    print(f"imgclf-team: users must log in (admin's password: {team.admin_password_file}); add members with "
          f"`imgclf-team user add NAME [--read-only] --dir {team.root}`", file=out)
    print(f"imgclf-team: on every machine of the team (Ctrl-C or SIGTERM here stops both):\n"
          f"export MLFLOW_TRACKING_URI={public_uri(args.host, args.port)}", file=out, flush=True)


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
        ensure_database(pg_port, password, AUTH_DATABASE)
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
                     "127.0.0.1; 0.0.0.0 for the team's machines: put TLS in front, see docs/team.md)")
    srv.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default 5000)")
    srv.add_argument("--pg-port", type=int, default=0, help="PostgreSQL's port on 127.0.0.1 (default: a free one)")
    srv.add_argument("--workers", type=int, default=4, help="the MLflow server's worker processes (default 4)")
    srv.add_argument("mlflow_args", nargs="*", help="after --: more `mlflow server` options, e.g. "
                     "-- --allowed-hosts mlflow.lab:5000")
    srv.set_defaults(func=serve)
    user = sub.add_parser("user", help="the team's members (run it on the server's machine, server running)")
    add = user.add_subparsers(dest="action", required=True).add_parser(
        "add", help="add a member: EDIT on every experiment and registered model (READ with --read-only); the "
        "password goes to DIR/members/NAME.password (mode 0600)")
    add.add_argument("name", help="the member's user name (letters, digits, '.', '_', '-')")
    add.add_argument("--read-only", action="store_true", help="READ only: see runs and models, change nothing")
    add.add_argument("--dir", default="team-server", help="the team server's folder (its admin's password; "
                     "default: ./team-server)")
    add.add_argument("--to", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
                     help="the team server (default: MLFLOW_TRACKING_URI, else http://127.0.0.1:5000)")
    add.set_defaults(func=add_member)
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
