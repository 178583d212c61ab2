"""`imgclf experiments`: presets x seeds through DVC's queue, then the table (docs/experiments.md).

command.py    the command: a thin layer over the queue, like DVC's own over repo/experiments/queue/
presets.py    the presets, each a params override with the report's number
dvc_queue.py  DVC's experiment queue behind one adapter: enqueue, start workers, watch, adopt
table.py      the table read back from MLflow: reports/experiments.md and .png

Imports the shared modules, files/ and tracking/.
"""
