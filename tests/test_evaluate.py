"""The evaluate stage (imgclf.evaluate): scores under TTA, reports, MLflow keys, and which run it logs into."""

from __future__ import annotations

import copy
import json

import keras
import mlflow
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, store_in
from fakes import make_params
from imgclf import evaluate
from imgclf.files import modelfile
from imgclf.prepare import prepare
from imgclf.files.modelfile import weights_sha256

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_final_metric_names_group_per_class_scores_under_a_prefix():
    results = {split: {"f1_macro": 0.5, "accuracy": 0.6, "per_class": {"cat": {"f1": 0.1}, "d/o g!": {"f1": 0.2}}}
               for split in ("dev", "test")}
    assert evaluate.final_metrics(results, ["cat", "d/o g!"]) == {
        "dev_f1_macro": 0.5, "dev_accuracy": 0.6, "test_f1_macro": 0.5, "test_accuracy": 0.6,
        "dev_f1_per_class/cat": 0.1, "dev_f1_per_class/d/o g_": 0.2,
        "test_f1_per_class/cat": 0.1, "test_f1_per_class/d/o g_": 0.2}


def test_the_training_run_is_found_only_for_this_very_model(tmp_path):
    trained = {"weights_sha256": "a" * 64}
    assert evaluate.training_run_id(tmp_path, trained) is None  # no reports/run.json on this machine
    (tmp_path / "run.json").write_text(json.dumps({"mlflow_run_id": "r1", "weights_sha256": "a" * 64}))
    assert evaluate.training_run_id(tmp_path, trained) == "r1"
    assert evaluate.training_run_id(tmp_path, {"weights_sha256": "b" * 64}) is None  # another model's run


def test_evaluate_writes_reports_and_logs_into_a_new_run_without_a_record(tmp_path, monkeypatch, empty_store):
    monkeypatch.chdir(tmp_path)
    store_in(tmp_path, empty_store)  # the default store here, its tables already made
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prepare(make_params(max_train_samples=100, dev_fraction=0.2), tmp_path / "prepared")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(inputs)))
    modelfile.save(model, tmp_path / "model.keras")
    reports = tmp_path / "reports"
    reports.mkdir()
    summary = {"epochs_run": 3, "early_stopped": False, "stopped_epoch": 0, "best_epoch": 3, "best_loss": 1.0,
               "collapsed": False, "stop_reason": "training_epochs", "weights_sha256": weights_sha256(model)}
    (reports / "train.json").write_text(json.dumps(summary))
    params = copy.deepcopy(PARAMS)
    params["evaluate"]["tta"] = "flip"
    metrics = evaluate.evaluate(params, tmp_path / "prepared", tmp_path / "model.keras", reports)
    assert metrics["train"]["stop_reason"] == "training_epochs" and metrics["dev"]["count"] == 20
    assert "mlflow_run_id" not in metrics
    rows = (reports / "dev_predictions.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 21
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("imgclf").experiment_id])
    assert run.data.tags["evaluation_of"] == "unknown" and run.data.tags["weights_sha256"] == summary["weights_sha256"]
    assert run.data.params["evaluate.tta"] == "flip" and run.info.status == "FINISHED"
    assert run.data.tags["evaluated"] == "true"  # what the experiments table counts
    assert run.info.run_name.startswith("report-digits-seed51-eval-")  # not MLflow's seeded random name
    assert run.data.metrics["dev_accuracy"] == metrics["dev"]["accuracy"]
    assert {f"dev_f1_per_class/{c}" for c in "0123456789"} <= set(run.data.metrics)
