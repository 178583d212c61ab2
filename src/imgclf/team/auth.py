"""The team server's authentication: MLflow's own basic-auth app (`mlflow server --app-name basic-auth`), its
configuration and secrets in the team folder, and the team's members (`imgclf-team user add`).

Users, password hashes and grants live in a second database of the team's PostgreSQL (`mlflow_auth`), beside
MLflow's: one server to back up (pg_dump of both, or a copy of TEAM_DIR), no sqlite file that four server workers
would write at once. The secrets stay out of `ps`, the logs and git: the admin's password, the key of the sign-up
form's CSRF tokens and PostgreSQL's password reach `mlflow server` through its environment; each sits in a 0600
file of TEAM_DIR (`.gitignore` keeps `team-server/` out of git).

The permission model (docs/team.md#who-may-do-what): `default_permission = NO_PERMISSIONS`, so a user without a
grant sees nothing, and no request without a valid user gets past the 401. Each member gets one grant on every
experiment and every registered model (pattern "*"): READ for --read-only, else EDIT (create runs anywhere, log,
register model versions; deleting stays with MANAGE: the admin, and a member on what they created themselves).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import warnings
from pathlib import Path

from imgclf.errors import ImgclfError
from imgclf.team.postgres import PG_USER, write_private
from imgclf.team.supervise import TeamDir, TeamError


ADMIN = "admin"


AUTH_DATABASE = "mlflow_auth"


# Checking a password costs one scrypt hash (~0.1 s of CPU here): at every request, a training run's hundreds of
# requests and a busy server would spend most of their time on it. Each server worker keeps a login that passed
# for this long; a member removed or a password changed through MLflow's API is honoured by the other workers only
# after it (docs/team.md).
AUTH_CACHE_SECONDS = 60


MEMBER_GRANTS = ("experiment", "registered_model")   # "*" of each: every one, present and future


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a file name in TEAM_DIR/members


def private_secret(path: Path) -> str:
    """The secret kept in `path` (0600), generated on first use."""
    if not path.is_file():
        write_private(path, secrets.token_urlsafe(24))  # 32 characters; MLflow asks for 12 at least
    return path.read_text().strip()


def write_config(team: TeamDir, pg_port: int) -> None:
    """basic_auth.ini for this start (PostgreSQL's port may change between starts); it holds no secret."""
    team.auth_config.write_text(
        "# Written by imgclf-team serve at every start; edits are lost (src/imgclf/team/auth.py).\n"
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = postgresql+psycopg2://{PG_USER}@127.0.0.1:{pg_port}/{AUTH_DATABASE}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n")


def server_env(team: TeamDir, pg_port: int) -> dict[str, str]:
    """What `mlflow server --app-name basic-auth` needs in its environment: the config file, the admin's
    password (used by MLflow only to create the admin on first start) and the CSRF key."""
    write_config(team, pg_port)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(team.auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": private_secret(team.admin_password_file),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": private_secret(team.secret_key_file)}


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name == ADMIN:
        raise ImgclfError(f"member name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not starting with "
                          f"'.', '_' or '-'), and not {ADMIN!r}")
    return name


def admin_client(team: TeamDir, uri: str):
    """MLflow's AuthServiceClient for `uri`, logged in as the team's admin (its password from TEAM_DIR)."""
    if not team.admin_password_file.is_file():
        raise TeamError(f"no {team.admin_password_file}: pass the --dir the team server runs with (it writes the "
                        "admin's password there on first start)")
    with warnings.catch_warnings():  # the import loads MLflow's server, whose Starlette warns of its own future
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    # MLflow's client reads the credentials from the environment at every request: this process acts as admin.
    os.environ["MLFLOW_TRACKING_USERNAME"] = ADMIN
    os.environ["MLFLOW_TRACKING_PASSWORD"] = team.admin_password_file.read_text().strip()
    return AuthServiceClient(uri)


def add_member(args: argparse.Namespace) -> int:
    """`imgclf-team user add NAME [--read-only]`: the user, its grants and its password in a 0600 file."""
    from imgclf.tracking.failures import TrackingError, store_errors
    from imgclf.tracking.store import configure

    name, team = check_name(args.name), TeamDir(Path(args.dir).resolve())
    client = admin_client(team, args.to)
    os.environ["MLFLOW_TRACKING_URI"] = args.to
    try:
        configure()  # bounded retries; one line when the server does not answer
    except TrackingError as exc:
        if ": 401 Unauthorized:" in str(exc):  # the line would tell a member what to set: this is the admin
            raise TeamError(f"{args.to} refuses the admin's password in {team.admin_password_file}: is this the "
                            "--dir of the server at --to?") from None
        raise
    permission = "READ" if args.read_only else "EDIT"
    password_file = team.members / f"{name}.password"
    team.members.mkdir(mode=0o700, exist_ok=True)
    if password_file.exists():
        raise TeamError(f"{password_file} exists: member {name} was added before; pick another name, or remove "
                        "the file and the user (as admin) first")
    with store_errors(f"run `imgclf-team user add {name}` again"):
        if _exists(client, name):
            raise TeamError(f"user {name} exists on {args.to}; pick another name")
        write_private(password_file, secrets.token_urlsafe(24))  # first: a made user's password is never lost
        try:
            client.create_user(name, password_file.read_text())
            try:
                for resource in MEMBER_GRANTS:
                    client.grant_user_permission(name, resource, "*", permission)
            except BaseException:
                client.delete_user(name)  # no half-made member: a user without its grants
                raise
        except BaseException:
            password_file.unlink()
            raise
    print(f"imgclf-team: member {name} added with {permission} on every experiment and registered model; their "
          f"password is in {password_file} (mode 0600): hand it over privately. On their machine:\n"
          f"export MLFLOW_TRACKING_URI={args.to} MLFLOW_TRACKING_USERNAME={name} "
          "MLFLOW_TRACKING_PASSWORD='<the password>'")
    return 0


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_user(name)
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
