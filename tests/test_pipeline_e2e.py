"""End to end: the real `dvc exp run` / `dvc repro` in a temporary git copy of the repo, tiny settings."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import yaml
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from conftest import ALWAYS_RUN, TINY, dvc_status, error_line, pipeline_env, reaped, run, set_args, stages_run
from fakes import damage_weights, save_image

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_exp_run_writes_every_output_then_repro_is_a_noop(trained, trained_copy):
    """The session's `dvc exp run` with TINY (conftest.trained), checked in a copy of its repo."""
    repo = trained_copy
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["dev"]["count"] == 200
    for name in ("x_train.npy", "y_train.npy", "x_dev.npy", "y_dev.npy"):
        assert (repo / "data/prepared" / name).is_file()
    assert (repo / "models/model.keras").stat().st_size > 0
    for png in ("reports/loss.png", "reports/confusion_matrix.png", "reports/mistakes.png", "reports/pr_curves.png"):
        assert (repo / png).read_bytes()[:8] == PNG_MAGIC
    pr = sorted(p.name for p in (repo / "reports/pr").iterdir())  # dvc plots data: a recall,precision CSV per class
    assert pr == [f"{c}.csv" for c in range(10)]
    assert (repo / "reports/pr/0.csv").read_text().startswith("recall,precision\n")

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert 0 <= metrics["dev"]["f1_macro"] <= 1 and 0 <= metrics["dev"]["accuracy"] <= 1
    assert "test" not in metrics  # digits has no test split
    assert metrics["train"]["epochs_run"] == 2 and metrics["train"]["stop_reason"] == "training_epochs"
    assert len(json.loads((repo / "reports/run.json").read_text())["mlflow_run_id"]) == 32  # untracked
    rows = list(csv.DictReader((repo / "reports/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["loss_sum"]) > float(r["loss"]) > 0 for r in rows)

    # The default tracking store sits at the repo root, ignored by git and by DVC.
    assert (repo / "mlflow.db").is_file() and (repo / "mlruns").is_dir()
    status = trained.status  # right after the run, before the fixture committed it
    assert "mlflow.db" not in status and "mlruns" not in status and ".venv" not in status

    again = run(["dvc", "repro"], repo)
    assert stages_run(again.stdout) == list(ALWAYS_RUN), again.stdout
    assert dvc_status(repo) == ALWAYS_RUN


def test_metrics_json_is_what_the_dev_predictions_score(trained):
    """metrics.json's dev scores, recomputed with scikit-learn from the per-image predictions evaluate wrote."""
    reports = trained.repo / "reports"
    classes = json.loads((trained.repo / "data/prepared/manifest.json").read_text())["classes"]
    rows = list(csv.DictReader((reports / "dev_predictions.csv").open()))
    actual, predicted = ([classes.index(row[key]) for row in rows] for key in ("actual", "predicted"))
    dev = json.loads((reports / "metrics.json").read_text())["dev"]
    assert dev["count"] == len(rows) == len(np.load(trained.repo / "data/prepared/y_dev.npy"))
    assert dev["accuracy"] == pytest.approx(accuracy_score(actual, predicted), abs=1e-12)
    assert dev["f1_macro"] == pytest.approx(
        f1_score(actual, predicted, labels=range(len(classes)), average="macro", zero_division=0), abs=1e-12)
    report = json.loads((reports / "classification_report.json").read_text())["dev"]
    assert report["confusion_matrix"] == confusion_matrix(actual, predicted, labels=range(len(classes))).tolist()


def test_a_train_param_change_does_not_rerun_prepare(trained_copy):
    params = yaml.safe_load((trained_copy / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.0005
    (trained_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(run(["dvc", "status", "--json"], trained_copy).stdout)
    assert "prepare" not in changed and "train" in changed


def test_bad_params_fail_before_any_stage_output_is_touched(repo_copy):
    params = (repo_copy / "params.yaml").read_text()
    (repo_copy / "params.yaml").write_text(params.replace("keep_prob: 0.6", "keep_prob: 1.6"))
    proc = run(["imgclf", "validate"], repo_copy, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.keep_prob=1.6: must be in (0, 1]" in proc.stderr
    proc = run(["dvc", "repro"], repo_copy, check=False)
    assert proc.returncode != 0 and "train.keep_prob=1.6" in proc.stdout + proc.stderr
    assert not (repo_copy / "data/prepared").exists()


def test_dvc_plots_render(trained_copy, tmp_path):
    out = tmp_path / "plots-out"
    run(["dvc", "plots", "show", "-o", str(out)], trained_copy, env=pipeline_env())
    html = (out / "index.html").read_text()
    assert "dev_f1_macro" in html and "loss" in html
    # The data, not only the names dvc.yaml gives: each plot holds its columns of the run's files, epoch by epoch.
    plots = plot_data(html)
    history = list(csv.DictReader((trained_copy / "reports/history.csv").open()))
    assert len(history) == 2  # TINY's epochs
    for key in ("loss", "dev_loss"):
        assert [(r["epoch"], r["dvc_inferred_y_value"]) for r in plots["Loss_per_epoch"] if r["field"] == key] == \
            [(h["epoch"], h[key]) for h in history], key
    assert [(r["epoch"], r["dev_f1_macro"]) for r in plots["Dev_macro-F1_per_epoch"]] == \
        [(h["epoch"], h["dev_f1_macro"]) for h in history]
    predictions = csv.DictReader((trained_copy / "reports/dev_predictions.csv").open())
    assert sorted((r["actual"], r["predicted"]) for r in plots["Dev_confusion_matrix"]) == \
        sorted((p["actual"], p["predicted"]) for p in predictions)
    for curve in sorted((trained_copy / "reports/pr").glob("*.csv")):  # a plot per class, from the folder
        points = [(r["recall"], r["precision"]) for r in csv.DictReader(curve.open())]
        assert [(r["recall"], r["precision"]) for r in plots[f"reports_pr_{curve.stem}_csv"]] == points and points


def plot_data(html: str) -> dict[str, list[dict]]:
    """Plot id (its dvc.yaml title) -> the rows of data in the vega-lite spec DVC's page embeds for it."""
    decoder, plots = json.JSONDecoder(), {}
    for match in re.finditer(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = ', html):
        spec, _ = decoder.raw_decode(html, match.end())
        plots[match.group(1)] = spec.get("data", {}).get("values", [])  # none: a plot without data
    return plots


def test_a_fresh_clone_reruns_to_the_same_bytes_and_a_clean_git_status(trained, tmp_path):
    """Same machine type and versions: a fresh clone's `dvc repro` rewrites every output, byte for byte."""
    repo = trained.repo  # committed with its outputs by the fixture; only read here
    # --no-optional-locks: no index refresh, whose index.lock another worker's `cp -a` of this repo could copy
    assert run(["git", "--no-optional-locks", "status", "--porcelain"], repo).stdout == ""
    clone = tmp_path / "clone"
    with reaped(tmp_path):
        run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
        assert not (clone / "models/model.keras").exists()  # DVC-cached outputs are not in git
        proc = run(["dvc", "repro"], clone)
    assert "Running stage 'train'" in proc.stdout  # it really trained again
    assert run(["git", "status", "--porcelain"], clone).stdout == ""
    assert (clone / "dvc.lock").read_bytes() == (repo / "dvc.lock").read_bytes()
    assert (clone / "models/model.keras").read_bytes() == (repo / "models/model.keras").read_bytes()
    # The run's id and wall time stay out of git: in the untracked reports/run.json (and MLflow).
    for name in ("metrics.json", "train.json", "history.csv"):
        text = (clone / "reports" / name).read_text()
        assert "mlflow_run_id" not in text and "seconds" not in text, name
    assert json.loads((clone / "reports/run.json").read_text())["train_seconds"] > 0


def test_a_collapse_is_warned_tagged_reported_and_still_evaluated(trained_copy):
    """A huge learning rate on tiny data kills every ReLU: the net predicts one class from epoch 3 on."""
    repo_copy = trained_copy  # the shared run's prepared data is this run's too: only train and evaluate run
    settings = TINY | {"train.training_epochs": "30", "train.learning_rate": "0.1", "tracking.variant": "report_final"}
    proc = run(["dvc", "exp", "run", *set_args(settings)], repo_copy)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: training collapsed")]
    assert len(warnings) == 1 and "stop_reason: collapsed" in warnings[0], proc.stderr[-3000:]
    print(warnings[0])  # shown by `pytest -rP`
    trained = json.loads((repo_copy / "reports/train.json").read_text())
    metrics = json.loads((repo_copy / "reports/metrics.json").read_text())
    assert trained["collapsed"] and trained["stop_reason"] == "collapsed"
    assert trained["epochs_run"] == trained["collapsed_epoch"] < 30
    assert metrics["train"]["collapsed"] is True and metrics["train"]["stop_reason"] == "collapsed"
    assert (repo_copy / "models/model.keras").is_file() and metrics["dev"]["f1_macro"] <= 0.15  # saved, evaluated
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    r = client.get_run(json.loads((repo_copy / "reports/run.json").read_text())["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["collapsed"] == "true"
    assert r.data.tags["collapsed_epoch"] == str(trained["collapsed_epoch"]) and r.data.tags["stop_reason"] == "collapsed"
    table = run(["imgclf", "experiments", "--table"], repo_copy).stdout
    row = next(line for line in table.splitlines() if line.startswith("| report_final |"))
    assert "| 1/1 (51) |" in row and "| — |" in row  # marked, and no mean left without it


def test_a_model_file_with_changed_weights_is_refused_by_evaluate_and_predict(trained_copy):
    """It still loads (the zip's CRCs are right, h5py reads what it finds): the hash train recorded tells."""
    damage_weights(trained_copy / "models/model.keras")
    image = save_image(trained_copy / "x.png")
    for command in (["evaluate"], ["predict", str(image)]):
        proc = run(["imgclf", *command], trained_copy, check=False)
        assert proc.returncode == 2 and proc.stdout == ""
        line = error_line(proc.stderr, command[0])
        assert line.startswith(f"imgclf {command[0]}: error: models/model.keras: its weights (sha256 ")
        assert "are not the ones training recorded in reports/train.json" in line and "rerun the train stage" in line


def test_predict_a_folder_with_a_corrupt_image_writes_every_other_row_and_exits_2(trained_copy):
    for i in range(3):
        save_image(trained_copy / f"shots/{i}.png")
    (trained_copy / "shots/bad.jpg").write_bytes(b"\xff\xd8 truncated")
    proc = run(["imgclf", "predict", "shots", "--output", "preds.csv", "--top-k", "3"], trained_copy, check=False)
    assert proc.returncode == 2
    assert error_line(proc.stderr, "predict").startswith("imgclf predict: error: 1 of 4 images could not be predicted")
    rows = list(csv.DictReader((trained_copy / "preds.csv").open()))
    assert [r["path"] for r in rows] == ["shots/0.png", "shots/1.png", "shots/2.png", "shots/bad.jpg"]
    classes = json.loads((trained_copy / "data/prepared/manifest.json").read_text())["classes"]
    assert all(r["class"] in classes and r["top3_class"] in classes and not r["error"] for r in rows[:3])
    assert rows[3]["class"] == "" and "shots/bad.jpg: unreadable or truncated image" in rows[3]["error"]
