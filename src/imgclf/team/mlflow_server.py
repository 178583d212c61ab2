"""The team's `mlflow server` on the PostgreSQL store, behind MLflow's basic-auth app (auth.py): starting it, the
URIs that reach it, and the warning when it listens beyond this machine (passwords in clear without TLS)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import requests

from imgclf.team.auth import server_env
from imgclf.team.postgres import DATABASE, PG_USER
from imgclf.team.supervise import Service, TeamDir, wait_for


MLFLOW_START_SECONDS = 300.0  # a first start runs MLflow's schema migrations: room for a loaded machine


WILDCARDS = ("0.0.0.0", "::", "")


def http_uri(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def local_uri(host: str, port: int) -> str:
    """The URI that reaches a server listening on `host` from this machine."""
    return http_uri({"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port)


def public_uri(host: str, port: int) -> str:
    """The tracking URI to hand out: this machine's name when the server listens on every interface."""
    return http_uri(socket.gethostname() if host in WILDCARDS else host, port)


def served_names(host: str) -> list[str]:
    """The names the team's machines reach a server listening on `host` by: this machine's short and full name
    for a wildcard (public_uri hands out the short one), else `host` itself; none for a loopback address."""
    if host in WILDCARDS:  # getfqdn() is `localhost` where /etc/hosts maps the name to 127.0.0.1
        return sorted({socket.gethostname(), socket.getfqdn()} - {"localhost", "localhost.localdomain"})
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return []
    return [] if host == "localhost" else [host]


def reach_by_name(host: str, port: int, mlflow_args: list[str]) -> list[str]:
    """`mlflow server` options that let the team reach it by name. MLflow 3 answers only Host headers of localhost
    and private-range addresses (its guard against DNS rebinding) and refuses the UI's writes from any other
    origin, so a server on 0.0.0.0 answered 403 to `http://NAME:PORT`, the URI it tells members to export. MLflow's
    defaults stay allowed; an --allowed-hosts or --cors-allowed-origins of the user's (after --) replaces ours."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = served_names(host)
    if not names:
        return []
    given = {arg.partition("=")[0] for arg in mlflow_args}
    hosts = [h for name in names for h in (name, urlsplit(http_uri(name, port)).netloc)]
    extra = [] if "--allowed-hosts" in given else ["--allowed-hosts", ",".join(get_default_allowed_hosts() + hosts)]
    if "--cors-allowed-origins" not in given:
        extra += ["--cors-allowed-origins", ",".join(http_uri(name, port) for name in names)]
    return extra


def start_mlflow(team: TeamDir, args: argparse.Namespace, pg_port: int, password: str) -> Service:
    """Start `mlflow server` with basic auth on the PostgreSQL store in its own session; wait until /health
    answers (the one route MLflow's auth leaves open)."""
    # libpq reads PGPASSWORD, MLflow the auth secrets: all stay out of `ps`, the logs and the config file.
    env = dict(os.environ, PGPASSWORD=password, **server_env(team, pg_port))
    # MLflow's job runner (GenAI jobs: scorers, prompt optimisation) adds two processes training runs never use.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{pg_port}/{DATABASE}",
           "--artifacts-destination", str(team.artifacts), "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers), "--app-name", "basic-auth",
           *reach_by_name(args.host, args.port, args.mlflow_args), *args.mlflow_args]
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


def warn_if_exposed(host: str) -> None:
    """Basic auth over plain HTTP sends every password in clear: say so when the server listens beyond this
    machine."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        print(f"imgclf-team: warning: --host {host} serves MLflow over plain HTTP: the members' passwords cross the "
              "network in clear; put TLS in front of it (a reverse proxy, docs/team.md) or keep it on a trusted "
              "network", file=sys.stderr)
