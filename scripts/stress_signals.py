"""Stress test (not in CI): SIGINT/SIGTERM at random moments of `imgclf train`, with both cores loaded.

Each trial starts a tiny training that runs until it is interrupted, sends SIGINT or SIGTERM after a
random delay of 1-60 s (seeded: the same delays every time), and checks what a job scheduler relies on: exit code
130, the MLflow run (if one was started yet) ended KILLED, no model written, and a checkpoint (if one was
written yet) whose state.json names weights that exist. Meanwhile one busy process per core competes for
the CPU, as a loaded machine would.

    python scripts/stress_signals.py [--trials 30] [--max-delay 60]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = ["train.training_epochs=500", "train.early_stopping.patience=500", "data.max_train_samples=200",
            "model.conv_blocks=[[8], [16]]", "model.dense_units=[32]"]


def burn() -> None:
    while True:
        pass


def trial(work: Path, signum: int, delay: float) -> dict:
    """One interrupted training in `work`; what came of it."""
    shutil.rmtree(work / "models", ignore_errors=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CI": "true", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [str(BIN / "imgclf"), *[a for s in SETTINGS for a in ("-S", s)], "train"]
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"code": "hung", "stderr": ""}
    state = work / "models/checkpoint/state.json"
    checkpoint = "none"
    if state.exists():
        saved = json.loads(state.read_text())
        checkpoint = "intact" if (state.parent / saved["weights"]).is_file() else "BROKEN"
    return {"code": proc.returncode, "checkpoint": checkpoint, "model": (work / "models/model.keras").exists(),
            "stderr": stderr.strip().splitlines()[-1:] or [""]}


def run_statuses(work: Path) -> Counter:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imgclf")
    return Counter(r.info.status for r in client.search_runs([exp.experiment_id])) if exp else Counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--max-delay", type=float, default=60.0, help="longest wait before the signal (s)")
    args = parser.parse_args()
    rng = random.Random(2026)
    work = Path(tempfile.mkdtemp(prefix="imgclf-stress-"))
    shutil.copy2(REPO / "params.yaml", work / "params.yaml")
    subprocess.run([str(BIN / "imgclf"), "-S", "data.max_train_samples=200", "prepare"], cwd=work, check=True,
                   capture_output=True)
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(os.cpu_count() or 2)]
    for b in burners:
        b.start()
    results = []
    try:
        for i in range(args.trials):
            signum = rng.choice([signal.SIGINT, signal.SIGTERM])
            delay = rng.uniform(1.0, args.max_delay)  # before ~1 s the interpreter may not have our handler yet
            result = trial(work, signum, delay)
            results.append(result)
            print(f"trial {i + 1:2d}: {signal.Signals(signum).name} after {delay:5.1f} s -> exit {result['code']}, "
                  f"checkpoint {result.get('checkpoint')}, model written {result.get('model')}", flush=True)
    finally:
        for b in burners:
            b.terminate()
    statuses = run_statuses(work)
    ok = sum(r["code"] == 130 and r["checkpoint"] != "BROKEN" and not r["model"] for r in results)
    print(f"\n{ok}/{len(results)} trials ended exit 130 with no model written and no broken checkpoint; "
          f"exit codes {dict(Counter(r['code'] for r in results))}; MLflow runs {dict(statuses)} "
          f"({len(results) - sum(statuses.values())} trials were signalled before their run started)")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok == len(results) and set(statuses) <= {"KILLED"} else 1


if __name__ == "__main__":
    sys.exit(main())
