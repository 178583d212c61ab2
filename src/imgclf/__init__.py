"""imgclf: a reproducible image-classification pipeline (DVC stages prepare, train, evaluate; MLflow tracking).

A regular package, not an implicit namespace one: another `imgclf` folder on sys.path cannot merge into it.
Left empty on purpose: every stage imports it, so anything here would load before validation and count as
code of every stage (dvc.yaml lists it).
"""
