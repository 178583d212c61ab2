"""`imgclf-team`: the team's MLflow server on PostgreSQL (docs/team.md).

command.py        the command line (the imgclf-team console script)
postgres.py       the PostgreSQL cluster: made on first use, started on 127.0.0.1, MLflow's database
mlflow_server.py  `mlflow server` on it (behind MLflow's basic auth), the URIs that reach it
auth.py           the basic-auth app's settings and secrets, and the team's members (`imgclf-team user add`)
supervise.py      the server's folder, its child processes: waiting for them, stopping them, their ports
move_in.py        copying a clone's local runs into the server

Imports the shared modules and tracking/.
"""
