"""The evaluate stage (imgclf.evaluate): scores under TTA, reports, MLflow keys, and which run it logs into."""

from __future__ import annotations

import copy
import csv
import io
import json

import keras
import mlflow
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from conftest import REPO, run, store_in
from fakes import make_params
from imgclf import evaluate
from imgclf.evaluation import figures
from imgclf.tracking import store
from imgclf.files import modelfile
from imgclf.prepare import prepare
from imgclf.files.modelfile import weights_sha256

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_final_metrics_are_the_headline_scores_only():
    # a key with a "/" makes a chart section that MLflow's run page lists above "Model metrics" (loss, dev curves)
    results = {split: {"f1_macro": 0.5, "accuracy": 0.6, "per_class": {"cat": {"f1": 0.1}}}
               for split in ("dev", "test")}
    assert evaluate.final_metrics(results) == {
        "dev_f1_macro": 0.5, "dev_accuracy": 0.6, "test_f1_macro": 0.5, "test_accuracy": 0.6}


SCORES = st.fixed_dictionaries({k: st.floats(0, 1) for k in ("precision", "recall", "f1")}
                               | {"support": st.integers(0, 10**6)})


@settings(deadline=None)  # pure and quick: a deadline would only time the machine's load
@given(st.lists(st.text(max_size=20), min_size=1, max_size=6, unique=True), st.data())
def test_the_per_class_table_reads_back_every_class_and_score(classes, data):
    results = {split: {"per_class": {c: data.draw(SCORES) for c in classes}} for split in ("dev", "test")}
    rows = list(csv.DictReader(io.StringIO(evaluate.per_class_table(results, classes), newline="")))
    assert [(r["split"], r["class"]) for r in rows] == [(s, c) for s in ("dev", "test") for c in classes]
    for r in rows:
        scores = results[r["split"]]["per_class"][r["class"]]
        assert {k: float(r[k]) for k in ("precision", "recall", "f1")} | {"support": int(r["support"])} == scores


def test_the_training_run_is_found_only_for_this_very_model(tmp_path):
    trained = {"weights_sha256": "a" * 64}
    assert evaluate.training_run_id(tmp_path, trained) is None  # no reports/run.json on this machine
    (tmp_path / "run.json").write_text(json.dumps({"mlflow_run_id": "r1", "weights_sha256": "a" * 64}))
    assert evaluate.training_run_id(tmp_path, trained) == "r1"
    assert evaluate.training_run_id(tmp_path, {"weights_sha256": "b" * 64}) is None  # another model's run


def model_and_data(tmp_path, monkeypatch, empty_store) -> dict:
    """In tmp_path (the working directory now): a store, prepared digits, an untrained model and its
    reports/train.json; the summary written there."""
    monkeypatch.chdir(tmp_path)
    store_in(tmp_path, empty_store)  # the default store here, its tables already made
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
    return summary


def test_evaluate_writes_reports_and_logs_into_a_new_run_without_a_record(tmp_path, monkeypatch, empty_store):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = model_and_data(tmp_path, monkeypatch, empty_store)
    reports = tmp_path / "reports"
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
    assert run.data.metrics["dev/accuracy"] == metrics["dev"]["accuracy"]
    # the split's section and no other above "Model metrics" (no per-class section: the CSV below holds those)
    assert set(run.data.metrics) == {"dev/accuracy", "dev/f1_macro"}
    table = MlflowClient().download_artifacts(run.info.run_id, evaluate.PER_CLASS_CSV, str(tmp_path / "dl"))
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    report = json.loads((reports / "classification_report.json").read_text())
    assert {(r["split"], r["class"]): float(r["f1"]) for r in rows} == {
        (split, c): scores["f1"] for split in report for c, scores in report[split]["per_class"].items()}


def test_a_relative_sqlite_tracking_uri_is_the_working_directory_s_file(tmp_path, monkeypatch, empty_store):
    # what docs/serving.md has people export; the store check died on it with a traceback
    model_and_data(tmp_path, monkeypatch, empty_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    metrics = evaluate.evaluate(copy.deepcopy(PARAMS), tmp_path / "prepared", tmp_path / "model.keras",
                                tmp_path / "reports")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imgclf").experiment_id])
    assert run.data.metrics["dev/accuracy"] == metrics["dev"]["accuracy"]


def test_per_class_curve_files_are_unique_reversible_and_drawn_by_dvc_plots(tmp_path):
    # "猫" and "犬" both became "_.csv", "a b" and "a_b" both "a_b.csv": one curve overwrote the other
    names = ["猫", "犬", "a b", "a_b", "a%20b", ".", "", "0"]
    curves = {name: (np.array([0.0, 1.0]), np.array([1.0, 0.5 + i / 100]), 0.9) for i, name in enumerate(names)}
    folder = tmp_path / "reports/pr"
    figures.write_pr_data(curves, folder)
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == len(names) and "0.csv" in files and all(not f.startswith(".") for f in files)
    assert {figures.class_name(f.removesuffix(".csv")) for f in files} == set(names)
    for name in names:
        rows = (folder / f"{figures.file_name(name)}.csv").read_text().splitlines()
        assert rows == ["recall,precision", "0.0000,1.0000", f"1.0000,{0.5 + names.index(name) / 100:.4f}"]
    (tmp_path / "dvc.yaml").write_text("plots:\n  - reports/pr:\n      template: linear\n      x: recall\n"
                                       "      y: precision\n")
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    shown = json.loads(run(["dvc", "plots", "show", "--json"], tmp_path).stdout)["data"]
    for name in names:
        (plot,) = shown[f"reports/pr/{figures.file_name(name)}.csv"]
        values = plot["content"]["data"]["values"]
        assert [p["precision"] for p in values] == ["1.0000", f"{0.5 + names.index(name) / 100:.4f}"]


@given(st.text(max_size=40))
def test_file_name_round_trips_and_is_a_plain_file_name(name):
    stem = figures.file_name(name)
    assert figures.class_name(stem) == name and stem and not stem.startswith(".")
    assert set(stem) <= set(figures.FILE_SAFE) | set("%0123456789ABCDEF")


@pytest.mark.parametrize("uri, absolute", [
    ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
    ("sqlite:///sub/m.db?timeout=5", "sqlite:///{cwd}/sub/m.db?timeout=5"),
    ("file:mlruns", "file://{cwd}/mlruns"), ("mlruns", "{cwd}/mlruns"), ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"), ("file:///abs/m", "file:///abs/m"), ("/abs/m", "/abs/m"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"), ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("databricks", "databricks")])
def test_relative_store_uris_are_made_absolute_and_others_kept(tmp_path, monkeypatch, uri, absolute):
    monkeypatch.chdir(tmp_path)
    assert store.absolute_uri(uri) == absolute.format(cwd=tmp_path)
