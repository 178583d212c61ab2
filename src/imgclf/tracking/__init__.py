"""MLflow tracking, split by responsibility as MLflow's own tracking/ is.

store.py     which store (MLFLOW_TRACKING_URI or the repo's sqlite file), bounded retries, reachability, the
             sqlite checks, the lock that serialises creating a store, a lost get-or-create race
failures.py  TrackingError and a store's failure as one line
context.py   a run's name, its params as MLflow logs them, lineage and environment tags, tag names
orphans.py   runs left RUNNING by a process that died
tracker.py   Tracker: connects, opens, reopens and ends pipeline runs
runs.py      one handle per stage: TrainingRun, EvaluationRun (and NullRun for a non-chief worker)
keys.py      the scores' MLflow keys (`train/loss`, `dev/f1_macro`), read back from runs of either naming
promotion.py `imgclf promote`: a registry alias on a run's model version, guarded by the dev score
verdict.py   `imgclf rerun` on another kind of machine: did the result reproduce, by the preset's seed spread

Imports the shared modules, files/ and training/numerics.py (the CPU facts); train, evaluate, rerun, serving/,
experiments/ and team/ import it. It never imports serving/: train hands TrainingRun the function that logs the
model.
"""
