"""Files every stage reads or writes.

atomic.py           atomic writes, JSON, one line naming the output when a write fails (HDF5's included)
folders.py          replacing a whole folder (data/prepared) and recovering what a killed writer left
digests.py          sha256 of bytes, files and arrays
paths.py            every path and file name of the pipeline, and the project root
prepared_reader.py  data/prepared read back and checked against its manifest (train, evaluate, rerun)
modelfile.py        models/model.keras: deterministic save, safe load, its weights checked against train's record
walk.py             the one directory walker and its symlink policy (folder source, fingerprint, predict)
code.py             the train stage's code: its files (dvc.yaml's deps), their digest, whether git has them
at_commit.py        a run's commit as files: a temporary git worktree, its code checked, its data placed (rerun.py trains there)

Imports only errors and process (at_commit holds signals while it removes a worktree). prepare's writer is prepare.py
itself: the reader stays apart, so train's and evaluate's DVC deps list only the modules they import, never the data sources.
"""
