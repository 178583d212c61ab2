"""The verdict on a result where the bits cannot match (imgclf.tracking.verdict): a rerun on another kind of machine
(its cpu tags differ) says DIFF for the weights, then the scores beside each other against the preset's measured
seed-to-seed spread, REPRODUCED or NOT REPRODUCED in one line. Read from a real MLflow store."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import run, store_in
from imgclf import rerun
from imgclf.tracking import verdict
from imgclf.training.numerics import cpu_facts

ZEN3 = {"cpu_model": "AMD EPYC 7B13 64-Core Processor", "cpu_isa": "avx2"}  # an AVX2-only Zen 3
REPORT = {"model.arch": "report", "data.dataset": "digits", "train.training_epochs": "50"}
TOLERANCE = verdict.SPREADS[("report", "digits", 50)].tolerance


@pytest.fixture
def client(tmp_path, monkeypatch, empty_store):
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) stay in tmp_path
    mlflow.set_tracking_uri(store_in(tmp_path, empty_store))
    return MlflowClient()


def logged_run(client, weights: str, dev_f1: list[float], params: dict = REPORT, **tags) -> str:
    """A finished run as training logs it: tags, flattened params, dev macro-F1 per epoch."""
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run_id = client.create_run(exp.experiment_id, tags={"weights_sha256": weights, **tags}).info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for step, score in enumerate(dev_f1, start=1):
        client.log_metric(run_id, "dev_f1_macro", score, step=step)
        client.log_metric(run_id, "loss", 1.0 / step, step=step)
    return run_id


def rerun_lines(client, original: str, new: str) -> list[str]:
    """What `imgclf rerun` prints after retraining `original` as `new` (rerun.main's comparison)."""
    match, lines = rerun.compare(client, client.get_run(original), new)
    assert not match
    return lines + verdict.across_machines(client, client.get_run(original), new)


def test_a_rerun_on_another_cpu_is_diff_for_the_bits_and_reproduced_within_the_seed_spread(client):
    here = {k: cpu_facts()[k] for k in ("cpu_model", "cpu_isa")}
    original = logged_run(client, "e" * 64, [0.5, 0.972], **ZEN3)
    new = logged_run(client, "3" * 64, [0.4, 0.972 + TOLERANCE / 2], **here, rerun_of=original)
    lines = rerun_lines(client, original, new)
    assert lines[0].startswith("DIFF: weights sha256 " + "3" * 64)
    assert "  another kind of machine (cpu_model, cpu_isa differ): the bits cannot match; the scores:" in lines
    assert lines[-2] == (f"  dev_f1_macro: original 0.9720, rerun {0.972 + TOLERANCE / 2:.4f}; tolerance "
                         f"{TOLERANCE:.4f}, the largest seed-to-seed difference of "
                         f"{verdict.SPREADS[('report', 'digits', 50)].source}")
    assert lines[-1] == (f"REPRODUCED: dev_f1_macro {0.972 + TOLERANCE / 2:.4f} (rerun) against 0.9720 (original), "
                         f"difference {TOLERANCE / 2:.4f} <= tolerance {TOLERANCE:.4f}")
    assert client.get_run(new).data.tags["result_reproduced"] == "true"


def test_a_score_beyond_the_seed_spread_is_not_reproduced(client):
    original = logged_run(client, "e" * 64, [0.972], **ZEN3)
    new = logged_run(client, "3" * 64, [0.972 - TOLERANCE - 0.01], cpu_model="AMD EPYC", cpu_isa="avx2 avx512f")
    last = rerun_lines(client, original, new)[-1]
    assert last.startswith(f"NOT REPRODUCED: dev_f1_macro {0.972 - TOLERANCE - 0.01:.4f} (rerun) against 0.9720 "
                           f"(original), difference {TOLERANCE + 0.01:.4f} > tolerance")
    assert client.get_run(new).data.tags["result_reproduced"] == "false"


def test_the_same_kind_of_machine_gets_no_verdict_a_diff_there_is_a_real_change(client):
    original = logged_run(client, "e" * 64, [0.972], **ZEN3)
    new = logged_run(client, "3" * 64, [0.9], **ZEN3)
    assert verdict.across_machines(client, client.get_run(original), new) == []
    assert "result_reproduced" not in client.get_run(new).data.tags


def test_another_device_counts_as_another_kind_of_machine(client):
    original = logged_run(client, "e" * 64, [0.972], device="GPU: NVIDIA H100 (x1)")
    new = logged_run(client, "3" * 64, [0.972], device="CPU: x86_64 (2 cores)")
    lines = verdict.across_machines(client, client.get_run(original), new)
    assert lines[0].startswith("  another kind of machine (device differ)") and lines[-1].startswith("REPRODUCED")


def test_a_preset_without_a_measured_spread_is_not_judged(client):
    tiny = REPORT | {"train.training_epochs": "2"}
    original = logged_run(client, "e" * 64, [0.5, 0.6], tiny, **ZEN3)
    new = logged_run(client, "3" * 64, [0.5, 0.6], tiny, cpu_model="AMD EPYC", cpu_isa="avx2 avx512f")
    lines = verdict.across_machines(client, client.get_run(original), new)
    assert lines[-1] == ("RESULT NOT JUDGED: no measured seed-to-seed spread for preset report on digits with 2 "
                         "epochs (imgclf.tracking.verdict.SPREADS); compare the scores by hand")
    assert "result_reproduced" not in client.get_run(new).data.tags


def test_trainings_last_epoch_is_compared_not_evaluates_later_score_and_test_scores_stand_beside(client):
    """evaluate logs dev_f1_macro again at the last step (with TTA, say) and test scores: the verdict compares what
    both runs' training logged, and shows the test scores it has."""
    original = logged_run(client, "e" * 64, [0.5, 0.972], **ZEN3)
    client.log_metric(original, "dev_f1_macro", 0.5, step=2)  # evaluate's, later: not training's
    client.log_metric(original, "test_f1_macro", 0.97, step=2)
    new = logged_run(client, "3" * 64, [0.5, 0.972], cpu_model="AMD EPYC", cpu_isa="avx2 avx512f")
    lines = verdict.across_machines(client, client.get_run(original), new)
    assert lines[-2:] == ["  test_f1_macro: original 0.9700, rerun not evaluated (run `imgclf evaluate` on it)",
                          "REPRODUCED: dev_f1_macro 0.9720 (rerun) against 0.9720 (original), difference 0.0000 "
                          f"<= tolerance {TOLERANCE:.4f}"]


@pytest.mark.parametrize("params, key", [
    ({"model.arch": "fast", "model.fast.optimizer": "muon", "data.dataset": "cifar10", "train.training_epochs": "8"},
     ("fast_muon", "cifar10", 8)),
    ({"model.arch": "fast", "model.fast.optimizer": "nesterov", "data.dataset": "cifar10",
      "train.training_epochs": "10"}, ("fast", "cifar10", 10)),
    ({"train.training_epochs": "many"}, ("?", "?", 0)),
])
def test_the_preset_of_a_run_comes_from_its_params(params, key):
    assert verdict.preset(params) == key


@pytest.mark.e2e
def test_imgclf_rerun_of_a_run_whose_cpu_tags_name_another_cpu_says_diff_then_judges_the_result(trained_copy,
                                                                                              trained):
    """The run as a Zen 3 would have logged it (its CPU, its own weights); the rerun here trains TINY, a preset
    without a measured spread: DIFF, the machine facts, the scores' verdict line, exit 1."""
    client = MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}")
    for tag, value in ZEN3.items():
        client.set_tag(trained.run_id, tag, value)
    client.set_tag(trained.run_id, "weights_sha256", "e" * 64)
    proc = run(["imgclf", "rerun", "--current-code", trained.run_id], trained_copy, check=False)
    assert proc.returncode == 1 and "DIFF: weights sha256 " in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert f"  environment differs: cpu_model: {ZEN3['cpu_model']} -> {cpu_facts()['cpu_model']}" in lines
    assert "  another kind of machine (cpu_model, cpu_isa differ): the bits cannot match; the scores:" in lines
    assert lines[-1] == ("RESULT NOT JUDGED: no measured seed-to-seed spread for preset report on digits with 2 "
                         "epochs (imgclf.tracking.verdict.SPREADS); compare the scores by hand")
