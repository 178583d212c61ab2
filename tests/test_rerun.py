"""`imgclf rerun` (imgclf.rerun): what MATCH and DIFF say, read from a real MLflow store."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, store_in
from imgclf import rerun
from imgclf.errors import ImgclfError


@pytest.fixture
def client(tmp_path, monkeypatch, empty_store):
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) stay in tmp_path
    mlflow.set_tracking_uri(store_in(tmp_path, empty_store))
    return MlflowClient()


def logged_run(client, weights: str, losses: list[float], **tags) -> str:
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run = client.create_run(exp.experiment_id, tags={"weights_sha256": weights, **tags})
    for step, loss in enumerate(losses, start=1):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    return run.info.run_id


def test_match_and_the_explanation_of_a_diff(client):
    first = logged_run(client, "a" * 64, [3.0, 2.0], device="CPU: x86_64 (2 cores)")
    same = logged_run(client, "a" * 64, [3.0, 2.0], device="CPU: x86_64 (2 cores)")
    other = logged_run(client, "b" * 64, [3.0, 2.5], device="GPU: H100 (x1)")
    match, lines = rerun.compare(client, client.get_run(first), same)
    assert match and lines == [f"MATCH: weights sha256 {'a' * 64} (run {same})"]
    match, lines = rerun.compare(client, client.get_run(first), other)
    assert not match and lines[1:] == ["  first epoch whose loss differs: 2",
                                       "  environment differs: device: CPU: x86_64 (2 cores) -> GPU: H100 (x1)"]


def test_a_diff_names_the_cpu_isa_and_onednn_switches_that_differ(client):
    """The facts that tell 'another CPU' from 'a real change': same device string, different oneDNN kernels."""
    first = logged_run(client, "a" * 64, [3.0], cpu_model="AMD EPYC", cpu_isa="avx2 avx512f avx512_bf16",
                       kernels="onednn")
    other = logged_run(client, "b" * 64, [3.0], cpu_model="AMD EPYC", cpu_isa="avx2",
                       onednn_max_cpu_isa="AVX2", kernels="eigen")
    _, lines = rerun.compare(client, client.get_run(first), other)
    assert lines[1:] == ["  per-epoch losses are identical",
                         "  environment differs: kernels: onednn -> eigen",
                         "  environment differs: cpu_isa: avx2 avx512f avx512_bf16 -> avx2",
                         "  environment differs: onednn_max_cpu_isa: None -> AVX2"]


def test_first_difference():
    assert rerun.first_difference({1: 3.0, 2: 2.0}, {1: 3.0, 2: 2.0}) is None
    assert rerun.first_difference({1: 3.0, 2: 2.0}, {1: 3.0}) == 2


def test_a_run_that_never_finished_training_is_refused(client):
    run_id = client.create_run(client.create_experiment("u")).info.run_id
    client.log_text(run_id, "seed: 1\n", "params.yaml")  # its params are there, its weights hash is not
    with pytest.raises(ImgclfError, match=f"MLflow run {run_id} has no weights_sha256 tag"):
        rerun.fetch_run(client, run_id)


def test_a_run_logged_before_a_key_existed_gets_the_repo_default_and_says_so(client, capsys):
    logged = yaml.safe_load((REPO / "params.yaml").read_text())
    del logged["train"]["stop_on_collapse"], logged["tracking"]["variant"]  # keys added after the run
    run_id = logged_run(client, "a" * 64, [1.0], data_digest="d" * 64)
    client.log_text(run_id, yaml.safe_dump(logged, sort_keys=False), "params.yaml")
    _, params = rerun.fetch_run(client, run_id, REPO / "params.yaml")
    assert params["train"]["stop_on_collapse"] is True and params["tracking"]["variant"] is None
    assert (f"params.yaml of run {run_id} predates train.stop_on_collapse, tracking.variant: "
            "using their values in " + str(REPO / "params.yaml")) in capsys.readouterr().out
