"""`imgclf-team`: the team's MLflow server on PostgreSQL, supervised as child processes, and moving a local
store's runs into it."""
