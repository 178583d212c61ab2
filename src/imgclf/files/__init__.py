"""Files every stage reads or writes.

atomic.py           atomic writes, JSON, one line naming the output when a write fails (HDF5's included)
folders.py          replacing a whole folder (data/prepared) and recovering what a killed writer left
digests.py          sha256 of bytes, files and arrays
paths.py            every path and file name of the pipeline, and the project root
prepared_reader.py  data/prepared read back and checked against its manifest (train, evaluate, rerun)
modelfile.py        models/model.keras: deterministic save, safe load, its weights checked against train's record
code.py             the train stage's code: its files (dvc.yaml's deps), their digest, whether git has them
at_commit.py        a run's commit in a temporary git worktree with its data and params: where `imgclf rerun` trains

Imports only errors and process (at_commit runs `imgclf train` as a child process). prepare's writer is prepare.py itself: the reader stays apart, so train's and
evaluate's DVC deps list only the modules they import, never the data sources.
"""
