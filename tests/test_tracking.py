"""MLflow tracking against a real `mlflow server` on 127.0.0.1: what every pipeline run logs."""

from __future__ import annotations

import functools
import json
import uuid

import keras
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, UNTIL_INTERRUPTED, finished_runs, free_port, pipeline_env, run, set_args
from conftest import wait_for_metric
from imgclf.training.early_stopping import make as early_stopping
from imgclf.data.images import load_image
from imgclf.training.numerics import cpu_facts
from imgclf.files.modelfile import load as load_model
from imgclf.tta import softmax
from imgclf.tracking.context import flatten

pytestmark = pytest.mark.e2e


@pytest.mark.long(70)
def test_two_runs_side_by_side_with_everything_logged(repo_copy, mlflow_server):
    experiment = f"side-by-side-{uuid.uuid4().hex[:8]}"
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow_server)
    base = TINY | {"tracking.experiment": experiment}
    for lr in ("0.001", "0.0005"):
        run(["dvc", "exp", "run", *set_args(base | {"train.learning_rate": lr})], repo_copy, env)

    runs = finished_runs(mlflow_server, experiment)
    assert [r.data.params["train.learning_rate"] for r in runs] == ["0.001", "0.0005"]
    head = run(["git", "rev-parse", "HEAD"], repo_copy).stdout.strip()
    client = MlflowClient(mlflow_server)
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    for r in runs:
        assert r.info.status == "FINISHED"
        assert set(flatten(params)) | {"model.num_params"} <= set(r.data.params)
        assert r.data.params["data.dataset"] == "digits" and int(r.data.params["model.num_params"]) > 0
        epochs = int(r.data.metrics["epochs_run"])
        for key in ("train/loss", "train/loss_sum", "train/accuracy", "dev/loss", "early_stopping_wait", "epoch_seconds"):
            history = client.get_metric_history(r.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
        for key in ("dev/accuracy", "dev/f1_macro"):  # per epoch, then the evaluated value at the last step
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert steps == [*range(1, epochs + 1), epochs], key
        assert r.data.tags["early_stopped"] == "False" and r.data.metrics["stopped_epoch"] == 0
        assert {"best_epoch", "best_loss", "early_stopped"} <= set(r.data.metrics)  # results, not settings (#43)
        assert not {"early_stopped", "stopped_epoch", "best_epoch", "best_loss", "stop_reason"} & set(r.data.params)
        assert 0 <= r.data.metrics["dev/f1_macro"] <= 1 and "dev/accuracy" in r.data.metrics
        # MLflow's run page draws a section per key prefix above "Model metrics": the dev and train scores' two
        # (so it opens on them), no other; the per-class scores are the per_class_metrics.csv artifact (below)
        assert {k.rpartition("/")[0] for k in r.data.metrics} == {"", "dev", "train"}
        assert not {"loss", "dev_loss", "dev_f1_macro"} & set(r.data.metrics)
        assert r.data.params["evaluate.tta"] == "none" and r.data.params["train.tf32"] == "False"
        assert r.data.tags["tf32"] == "false" and r.data.tags["collapsed"] == "false"
        assert r.data.tags["stop_reason"] == "training_epochs"
        assert r.data.tags["dvc_exp_name"] and r.info.run_name == r.data.tags["dvc_exp_name"]
        assert len(r.data.tags["git_commit"]) == 40 and len(r.data.tags["weights_sha256"]) == 64
        assert r.data.tags["dvc_exp_baseline_rev"] == r.data.tags["git_commit"] == head  # DVC passes it to stages
        assert r.data.tags["evaluated"] == "true" and "resumed_from" not in r.data.tags
        assert r.data.tags["tensorflow_version"] and r.data.tags["device"].startswith(("CPU", "GPU"))
        # which oneDNN kernels ran: the CPU, and any switch the shell set (the runs inherit it, as under an emulated
        # AVX2 CPU's TF_ENABLE_ONEDNN_OPTS=0 ONEDNN_MAX_CPU_ISA=AVX2)
        assert {k: r.data.tags.get(k) for k in cpu_facts()} == cpu_facts()
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"history.csv", "loss.png", "confusion_matrix.png", "mistakes.png", "pr_curves.png", "params.yaml",
                "data", "per_class_metrics.csv"} <= artifacts
        assert r.inputs.dataset_inputs[0].dataset.digest == r.data.tags["data_digest"][:36]

    # The last run's model, loaded through pyfunc, answers the classes and probabilities of the Keras model on disk.
    run_info = json.loads((repo_copy / "reports/run.json").read_text())  # untracked: ids stay out of git
    assert run_info["mlflow_run_id"] == runs[-1].info.run_id
    assert "mlflow_run_id" not in (repo_copy / "reports/metrics.json").read_text()
    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{runs[-1].info.run_id}/model")
    x = np.load(repo_copy / "data/prepared/x_dev.npy")[:8].astype(np.float32)
    expected = softmax(load_model(str(repo_copy / "models/model.keras")).predict(x, verbose=0).astype(np.float64))
    classes = json.loads((repo_copy / "data/prepared/manifest.json").read_text())["classes"]
    answer = pyfunc.predict(x)
    assert answer["class"].tolist() == [classes[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(answer["probability"], expected.max(axis=1), rtol=1e-5, atol=1e-6)

    # imgclf predict uses the same logged model.
    image = repo_copy / "digit.png"
    keras.utils.save_img(str(image), np.load(repo_copy / "data/prepared/x_dev.npy")[0])
    out = run(["imgclf", "predict", str(image), "--run", runs[-1].info.run_id], repo_copy, env).stdout
    name, prob = out.strip().split("\t")[1:]
    logits = load_model(str(repo_copy / "models/model.keras")).predict(load_image(image)[None], verbose=0)
    assert name == classes[int(logits.argmax())]  # the class the model on disk picks for this very image
    assert float(prob) == pytest.approx(float(softmax(logits.astype(np.float64)).max()), abs=1e-4)


def test_nan_loss_ends_the_run_failed_and_writes_no_model(prepared_copy, mlflow_server):
    repo_copy = prepared_copy  # as after `imgclf prepare` with TINY
    experiment = f"nan-{uuid.uuid4().hex[:8]}"
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow_server)
    proc = run(["imgclf", *set_args(TINY | {"tracking.experiment": experiment, "train.learning_rate": "1e30"}),
                "train"], repo_copy, env, check=False)
    assert proc.returncode == 2 and "lower train.learning_rate" in proc.stderr
    assert [r.info.status for r in finished_runs(mlflow_server, experiment)] == ["FAILED"]
    assert not (repo_copy / "models/model.keras").exists()


def test_unreachable_server_fails_before_training(prepared_copy):
    repo_copy = prepared_copy  # as after `imgclf prepare` with TINY
    uri = f"http://127.0.0.1:{free_port()}"
    env = pipeline_env(MLFLOW_TRACKING_URI=uri)
    proc = run(["imgclf", *set_args(TINY), "train"], repo_copy, env, check=False)
    assert proc.returncode == 2
    assert f"MLflow tracking server {uri} is unreachable" in proc.stderr
    assert "Epoch" not in proc.stdout and not (repo_copy / "models").exists()


def test_crafted_early_stop_is_logged_at_its_epoch(tmp_path, mlflow_server, monkeypatch):
    from imgclf import train
    from imgclf.files import modelfile
    from imgclf.serving.pyfunc import log_served_model
    from imgclf.tracking import tracker as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    crafted = iter([9.0, 8.0, 8.5, 8.6, 7.0, 7.5, 7.6, 7.7])  # patience 2: stops at epoch 8

    class Crafted(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs.update(loss_sum=next(crafted), dev_loss=1.0, dev_accuracy=0.5, dev_f1_macro=0.5, epoch_seconds=0.1)

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment"] = f"crafted-{uuid.uuid4().hex[:8]}"
    params["tracking"]["register_model"] = f"{params['tracking']['experiment']}-model"
    tracker = tracking.Tracker.connect(params["tracking"])
    manifest = {"digest": "d" * 64, "dataset": "digits", "source": {"path": None}}
    early = early_stopping("loss", patience=2)
    with tracker.training_run(params, manifest, model, "CPU: test") as handle:
        result = model.fit(np.zeros((4, 32, 32, 3)), np.zeros(4), epochs=20, verbose=0,
                           callbacks=[Crafted(), early, handle.epoch_callback()])
        history = [{"epoch": i + 1, **{k: v[i] for k, v in result.history.items()}} for i in range(8)]
        train.write_history(history, tmp_path)
        summary = {**early.summary(), "epochs_run": 8, "weights_sha256": modelfile.weights_sha256(model),
                   "train_seconds": 1.0, "stop_reason": "early_stopping", "collapsed": False, "collapsed_epoch": 0}
        served = functools.partial(log_served_model, classes=[str(i) for i in range(10)], tta="none")
        handle.log_training_end(summary, model, tmp_path, served)

    (r,) = finished_runs(mlflow_server, params["tracking"]["experiment"])
    assert r.data.metrics["early_stopped"] == 1 and r.data.tags["early_stopped"] == "True"
    assert r.data.metrics["stopped_epoch"] == 8 and r.data.metrics["best_epoch"] == 5
    assert r.data.metrics["best_loss"] == 7.0 and r.data.tags["best_loss"] == "7.0"
    stop_points = MlflowClient(mlflow_server).get_metric_history(r.info.run_id, "early_stopped")
    assert [(m.step, m.value) for m in stop_points] == [(8, 1.0)]
    waits = MlflowClient(mlflow_server).get_metric_history(r.info.run_id, "early_stopping_wait")
    assert [m.value for m in sorted(waits, key=lambda m: m.step)] == [0, 0, 1, 2, 0, 1, 2, 3]
    (version,) = MlflowClient(mlflow_server).search_model_versions(f"name='{params['tracking']['register_model']}'")
    assert version.run_id == r.info.run_id


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_ends_the_run_killed(prepared_copy, mlflow_server, signal_name):
    import signal
    import subprocess

    repo_copy = prepared_copy  # as after `imgclf prepare` with TINY

    experiment = f"kill-{signal_name}-{uuid.uuid4().hex[:8]}"
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow_server)
    cmd = ["imgclf", *set_args(UNTIL_INTERRUPTED | {"tracking.experiment": experiment}), "train"]
    proc = subprocess.Popen(cmd, cwd=repo_copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_metric(mlflow_server, experiment, "train/loss")
        proc.send_signal(getattr(signal, signal_name))
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in stderr
    assert [r.info.status for r in finished_runs(mlflow_server, experiment)] == ["KILLED"]
    assert not (repo_copy / "models/model.keras").exists()


def test_mlproject_train_entry_point(prepared_copy, mlflow_server):
    repo_copy = prepared_copy  # as after `imgclf prepare` with TINY
    experiment = f"mlproject-{uuid.uuid4().hex[:8]}"
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_EXPERIMENT_NAME=experiment)
    run(["mlflow", "run", ".", "-e", "train", "-P", "learning_rate=0.0005", "-P", "training_epochs=1",
         "--env-manager", "local", "--experiment-name", experiment], repo_copy, env)
    (r,) = finished_runs(mlflow_server, experiment)
    assert r.info.status == "FINISHED"
    assert r.data.params["train.learning_rate"] == "0.0005" and r.data.params["learning_rate"] == "0.0005"
    assert r.data.metrics["epochs_run"] == 1 and (repo_copy / "models/model.keras").is_file()
