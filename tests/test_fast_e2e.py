"""The fast family end to end, through the real `dvc exp run`, MLflow and TensorFlow with tiny settings: it
trains, evaluates with TTA and logs; two processes give the same weights; a kill -9 after the lookahead
has started resumes to the same weights; the same for `model.fast.optimizer: muon`."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_TINY, pipeline_env, run, set_args
from fakes import make_folder, save_image
from imgclf.data.images import load_image
from imgclf.files.modelfile import load as load_model
from imgclf.tta import softmax
from imgclf.tta import predict_logits

pytestmark = pytest.mark.e2e


@pytest.mark.long(80)
def test_fast_family_through_dvc_exp_run_then_reruns_and_resumes_bit_identically(repo_copy):
    # 6 epochs: the run killed below after epoch 3 (lookahead started, whitening bias frozen) still has three left,
    # and this run is its uninterrupted twin.
    sets = FAST_TINY | {"train.training_epochs": "6"}
    run(["dvc", "exp", "run", *set_args(sets)], repo_copy)
    metrics = json.loads((repo_copy / "reports/metrics.json").read_text())
    trained = json.loads((repo_copy / "reports/train.json").read_text())
    assert trained["epochs_run"] == 6 and trained["stop_reason"] == "training_epochs" and not trained["collapsed"]
    assert 0 <= metrics["dev"]["f1_macro"] <= 1 and metrics["train"]["stop_reason"] == "training_epochs"
    rows = list(csv.DictReader((repo_copy / "reports/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    run_id = json.loads((repo_copy / "reports/run.json").read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{repo_copy / 'mlflow.db'}")
    client = MlflowClient()
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.params["model.arch"] == "fast"
    assert logged.data.params["evaluate.tta"] == "flip_translate" and logged.data.params["model.fast.flip"] == "alternating"
    assert logged.data.tags["weights_sha256"] == trained["weights_sha256"]
    assert logged.data.metrics["dev/f1_macro"] == pytest.approx(metrics["dev"]["f1_macro"])
    assert sorted(m.step for m in client.get_metric_history(run_id, "dev/accuracy")) == [*range(1, 7), 6]

    # A second process, same params and data: the same weights, bit for bit.
    cmd = ["imgclf", *set_args(sets), "train"]
    run(cmd, repo_copy)
    again = json.loads((repo_copy / "reports/train.json").read_text())
    assert again["weights_sha256"] == trained["weights_sha256"]

    # kill -9 once epoch 3 or later is checkpointed (the lookahead average exists), then resume.
    saved = kill_after_epoch(cmd, repo_copy, 3)
    killed_at = saved["epoch"]
    assert 3 <= killed_at < 6 and saved["callbacks"]["lookahead"]["arrays"]  # the average is in the checkpoint
    resumed = run(cmd, repo_copy)
    assert f"Resuming after epoch {killed_at}" in resumed.stdout
    after = json.loads((repo_copy / "reports/train.json").read_text())
    uninterrupted = trained  # the same params' uninterrupted run: dvc exp run's, above
    assert after["weights_sha256"] == uninterrupted["weights_sha256"]


def kill_after_epoch(cmd: list[str], cwd, epoch: int) -> dict:
    """Start `cmd`, kill -9 it once its checkpoint holds `epoch` or later; the checkpoint's state."""
    state = cwd / "models/checkpoint/state.json"
    proc = subprocess.Popen(cmd, cwd=cwd, env=pipeline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def checkpointed_epoch() -> int:
        try:
            return json.loads(state.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            return 0

    deadline = time.monotonic() + 180
    while checkpointed_epoch() < epoch and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())


@pytest.mark.long(75)
def test_muon_trains_evaluates_and_resumes_after_kill_to_the_same_weights(repo_copy):
    """Muon's momentum buffers, the whitening bias's own schedule (frozen after epoch 3) and the step count
    all come back from the checkpoint: a run killed after epoch 2 ends with the uninterrupted run's weights."""
    sets = FAST_TINY | {"model.fast.optimizer": "muon", "model.fast.lookahead_every": "0",
                        "train.training_epochs": "8"}
    cmd = ["imgclf", *set_args(sets), "train"]
    run(["imgclf", *set_args(sets), "prepare"], repo_copy)
    run(cmd, repo_copy)
    uninterrupted = json.loads((repo_copy / "reports/train.json").read_text())
    assert uninterrupted["epochs_run"] == 8 and not uninterrupted["collapsed"]
    run(["imgclf", *set_args(sets), "evaluate"], repo_copy)
    assert 0.3 < json.loads((repo_copy / "reports/metrics.json").read_text())["dev"]["accuracy"] <= 1  # it learned
    killed_at = kill_after_epoch(cmd, repo_copy, 2)["epoch"]
    assert 2 <= killed_at < 8
    resumed = run(cmd, repo_copy)
    assert f"Resuming after epoch {killed_at}" in resumed.stdout
    assert json.loads((repo_copy / "reports/train.json").read_text())["weights_sha256"] == uninterrupted["weights_sha256"]


@pytest.mark.long(56)
def test_the_fast_preset_runs_through_the_experiment_queue_into_the_table(repo_copy):
    tiny = {k: v for k, v in FAST_TINY.items() if k not in ("model.arch", "evaluate.tta")}
    proc = run(["imgclf", "experiments", "--variants", "fast", *set_args(tiny | {"train.training_epochs": "2"})],
               repo_copy, timeout=600)
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| fast |"))
    assert " | 51 | " in row and row.endswith("| — |")  # no report number to compare with
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("imgclf").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["variant"] == "fast"
    assert r.data.params["model.arch"] == "fast" and r.data.params["evaluate.tta"] == "flip_translate"
    assert r.data.params["train.early_stopping.monitor"] == "none" and r.data.metrics["epochs_run"] == 2


@pytest.mark.long(50)
def test_the_fast_family_trains_evaluates_and_predicts_at_another_image_size(repo_copy):
    """data.image_size=40: a folder of larger images is resized at prepare, the net follows the data."""
    images = make_folder(repo_copy.parent / "images", classes=("cat", "dog"), n_train=30, size=(57, 57))
    sets = FAST_TINY | {"data.dataset": "folder", "data.path": str(images), "data.image_size": "40",
                        "data.max_train_samples": "null", "data.dev_fraction": "0.2", "train.training_epochs": "2"}
    run(["imgclf", *set_args(sets), "prepare"], repo_copy)
    assert json.loads((repo_copy / "data/prepared/manifest.json").read_text())["image_shape"] == [40, 40, 3]
    run(["imgclf", *set_args(sets), "train"], repo_copy)
    run(["imgclf", *set_args(sets), "evaluate"], repo_copy)
    assert json.loads((repo_copy / "reports/metrics.json").read_text())["dev"]["count"] == 12
    photo = save_image(repo_copy.parent / "photo.png", size=(90, 70))
    out = run(["imgclf", *set_args(sets), "predict", str(photo)], repo_copy).stdout
    name, prob = out.strip().split("\t")[1:]
    # What the trained net itself says of the photo at 40x40, under evaluate.tta's views: the class and its odds.
    model = load_model(str(repo_copy / "models/model.keras"))
    probs = softmax(predict_logits(model, load_image(photo, 40)[None], sets["evaluate.tta"]).astype(np.float64))
    assert name == ["cat", "dog"][int(probs.argmax())] and float(prob) == pytest.approx(probs.max(), abs=1e-3)
    refused = run(["imgclf", *set_args(sets | {"model.arch": "report"}), "validate"], repo_copy, check=False)
    assert refused.returncode == 2 and "model.arch=report takes 32x32 images only" in refused.stderr
