"""MLflow: which store (and whether it works), one-line failures, what a run is named and tagged, runs left
RUNNING by a dead process, the tracker that opens runs, and what each stage logs into its run."""
