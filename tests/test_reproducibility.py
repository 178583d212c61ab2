"""Pinned seeds: separate processes give bit-identical weights; kill -9 + resume too; `imgclf rerun` proves it."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_TINY, TINY, pipeline_env, run, set_args
from imgclf.training.numerics import usable_flags

pytestmark = pytest.mark.e2e

SETTINGS = TINY | {"train.training_epochs": "20"}


def train(repo, **overrides) -> dict:
    """One `imgclf train` process; returns its train.json, run.json (the MLflow run id) and history rows."""
    run(["imgclf", *set_args(SETTINGS | overrides), "train"], repo)
    summary = json.loads((repo / "reports/train.json").read_text())
    summary |= json.loads((repo / "reports/run.json").read_text())
    summary["history"] = list(csv.DictReader((repo / "reports/history.csv").open()))
    return summary


def loss_only(history: list[dict]) -> list[tuple]:
    return [(row["epoch"], row["loss"], row["loss_sum"], row["dev_loss"]) for row in history]


def logged_losses(client, run_id: str) -> list[tuple]:
    """loss_only's columns as the run logged them to MLflow, epoch by epoch."""
    keys = ("train/loss", "train/loss_sum", "dev/loss")
    by_key = [sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys]
    assert [[step for step, _ in steps] for steps in by_key] == [[step for step, _ in by_key[0]]] * len(keys)
    return [(step, *(steps[i][1] for steps in by_key)) for i, (step, _) in enumerate(by_key[0])]


@pytest.mark.long(60)
def test_auto_precision_follows_the_cpu_is_recorded_and_reruns_bit_identical(prepared_copy):
    # fast_muon as the presets run it (train.mixed_precision: auto), tiny, on TINY's prepared data.
    sets = SETTINGS | FAST_TINY | {"data.max_train_samples": TINY["data.max_train_samples"], "train.training_epochs": "2",
                                   "model.fast.optimizer": "muon", "model.fast.lookahead_every": "0",
                                   "train.mixed_precision": "auto"}
    runs = []
    for _ in range(2):  # two processes
        proc = run(["imgclf", *set_args(sets), "train"], prepared_copy)
        runs.append(json.loads((prepared_copy / "reports/train.json").read_text())
                    | json.loads((prepared_copy / "reports/run.json").read_text()))
    # train.kernels=auto: oneDNN's on every AVX2 CPU, unless the shell switched them off (the emulated AVX2 path)
    path = "eigen" if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false") else "onednn"
    native_bf16 = path == "onednn" and bool(usable_flags() & {"avx512_bf16", "amx_bf16"})  # under the shell's ISA cap
    policy = "mixed_bfloat16" if native_bf16 else "none"
    assert f"Kernels: {path} (auto: " in proc.stdout
    assert f"Precision: {'float32' if policy == 'none' else policy} (auto: " in proc.stdout
    assert f"Muon's Newton-Schulz: {'bfloat16' if native_bf16 else 'float32'} (auto: " in proc.stdout
    assert runs[0]["weights_sha256"] == runs[1]["weights_sha256"]
    logged = MlflowClient(f"sqlite:///{prepared_copy / 'mlflow.db'}").get_run(runs[1]["mlflow_run_id"]).data
    assert logged.tags["mixed_precision"] == policy and logged.params["train.mixed_precision"] == "auto"
    assert logged.tags["kernels"] == path and logged.params["train.kernels"] == "auto"


@pytest.mark.long(120)
def test_same_seed_same_weights_resume_after_kill_and_rerun(prepared_copy):
    repo_copy = prepared_copy  # as after `imgclf prepare` with SETTINGS (TINY's data)
    # The second process with the same seed is `imgclf rerun` of the first run, below: the same weights and losses.
    first = train(repo_copy)
    assert loss_only(first["history"]) == [(str(step), *(repr(v) for v in values)) for step, *values in
                                           logged_losses(MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}"),
                                                         first["mlflow_run_id"])]
    other_seed = train(repo_copy, seed="52")
    assert other_seed["weights_sha256"] != first["weights_sha256"]

    # kill -9 once the first epoch is checkpointed, then restart: same weights, one continuous MLflow run.
    state = repo_copy / "models/checkpoint/state.json"
    cmd = ["imgclf", *set_args(SETTINGS), "train"]
    proc = subprocess.Popen(cmd, cwd=repo_copy, env=pipeline_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 1 <= killed_at < 20
    resumed = run(cmd, repo_copy)
    assert f"Resuming after epoch {killed_at}" in resumed.stdout
    after = json.loads((repo_copy / "reports/train.json").read_text())
    after |= json.loads((repo_copy / "reports/run.json").read_text())
    assert after["weights_sha256"] == first["weights_sha256"]
    assert not (repo_copy / "models/checkpoint").exists()
    mlflow.set_tracking_uri(f"sqlite:///{repo_copy / 'mlflow.db'}")
    client = MlflowClient()
    steps = sorted(m.step for m in client.get_metric_history(after["mlflow_run_id"], "train/loss"))
    assert steps == list(range(1, 21))
    assert client.get_run(after["mlflow_run_id"]).info.status == "FINISHED"

    # imgclf rerun: MATCH, exit 0, a new run tagged rerun_of / reproduced.
    proc = run(["imgclf", "rerun", first["mlflow_run_id"]], repo_copy)
    assert f"MATCH: weights sha256 {first['weights_sha256']}" in proc.stdout
    new_id = re.search(r"\(run (\w+)\)", proc.stdout).group(1)
    tags = client.get_run(new_id).data.tags
    assert tags["rerun_of"] == first["mlflow_run_id"] and tags["reproduced"] == "true"
    # ... a second process with the same seed: the same weights, the same losses at every epoch, a new run.
    second = {"weights_sha256": tags["weights_sha256"], "mlflow_run_id": new_id}
    assert first["weights_sha256"] == second["weights_sha256"]
    assert logged_losses(client, first["mlflow_run_id"]) == logged_losses(client, second["mlflow_run_id"])
    assert first["mlflow_run_id"] != second["mlflow_run_id"]

    # A logged hash that no longer matches: DIFF, exit 1, and the explanation lines.
    client.set_tag(first["mlflow_run_id"], "weights_sha256", "0" * 64)
    proc = run(["imgclf", "rerun", first["mlflow_run_id"]], repo_copy, check=False)
    assert proc.returncode == 1 and "DIFF: weights sha256" in proc.stdout
    assert "per-epoch losses are identical" in proc.stdout
    new_id = re.search(r"DIFF: weights sha256 \w+ \(run (\w+)\)", proc.stdout).group(1)
    assert client.get_run(new_id).data.tags["reproduced"] == "false"

    # Different prepared data and this tree's code: refused before any training (at the run's commit, the run's
    # data comes back from the DVC cache instead: test_rerun_at_commit.py).
    run(["imgclf", *set_args(SETTINGS | {"seed": "7"}), "prepare"], repo_copy)
    proc = run(["imgclf", "rerun", "--current-code", first["mlflow_run_id"]], repo_copy, check=False)
    assert proc.returncode == 2 and "is not the data run" in proc.stderr and "Epoch" not in proc.stdout


def test_rerun_of_an_unknown_run_is_one_clear_line(repo_copy):
    proc = run(["imgclf", "rerun", "0123456789abcdef0123456789abcdef"], repo_copy, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("imgclf rerun: error: MLflow run 0123456789abcdef0123456789abcdef")
