"""End to end: the real `dvc exp run` / `dvc repro` in a temporary git copy of the repo, tiny settings."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from conftest import TINY, pipeline_env, run, set_args

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_exp_run_writes_every_output_then_repro_is_a_noop(repo_copy):
    run(["dvc", "exp", "run", *set_args(TINY)], repo_copy)

    manifest = json.loads((repo_copy / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["dev"]["count"] == 200
    for name in ("x_train.npy", "y_train.npy", "x_dev.npy", "y_dev.npy"):
        assert (repo_copy / "data/prepared" / name).is_file()
    assert (repo_copy / "models/model.keras").stat().st_size > 0
    for png in ("reports/loss.png", "reports/confusion_matrix.png"):
        assert (repo_copy / png).read_bytes()[:8] == PNG_MAGIC

    metrics = json.loads((repo_copy / "reports/metrics.json").read_text())
    assert 0 <= metrics["dev"]["f1_macro"] <= 1 and 0 <= metrics["dev"]["accuracy"] <= 1
    assert "test" not in metrics  # digits has no test split
    assert metrics["train"]["epochs_run"] == 2 and len(metrics["mlflow_run_id"]) == 32
    rows = list(csv.DictReader((repo_copy / "reports/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["loss_sum"]) > float(r["loss"]) > 0 for r in rows)

    # The default tracking store sits at the repo root, ignored by git and by DVC.
    assert (repo_copy / "mlflow.db").is_file() and (repo_copy / "mlruns").is_dir()
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], repo_copy).stdout
    assert "mlflow.db" not in status and "mlruns" not in status and ".venv" not in status

    again = run(["dvc", "repro"], repo_copy)
    assert "Running stage" not in again.stdout, again.stdout
    assert run(["dvc", "status", "--json"], repo_copy).stdout.strip() == "{}"


def test_a_train_param_change_does_not_rerun_prepare(repo_copy):
    run(["dvc", "repro", "prepare"], repo_copy)
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.0005
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(run(["dvc", "status", "--json"], repo_copy).stdout)
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


def test_dvc_plots_render(repo_copy):
    run(["dvc", "exp", "run", *set_args(TINY | {"train.training_epochs": "1"})], repo_copy)
    out = repo_copy / "plots-out"
    run(["dvc", "plots", "show", "-o", str(out)], repo_copy, env=pipeline_env())
    html = (out / "index.html").read_text()
    assert "dev_f1_macro" in html and "loss" in html
