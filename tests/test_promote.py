"""`imgclf promote` (imgclf.promote): a registry alias on a run's model version, guarded by the dev score, and
`imgclf predict --model models:/NAME@ALIAS`; with the real MLflow registry of a trained repo's store."""

from __future__ import annotations

import re

import pytest
from mlflow.entities import LoggedModelOutput
from mlflow.tracking import MlflowClient

from conftest import error_line, run
from fakes import save_image

pytestmark = pytest.mark.e2e


@pytest.mark.long(60)
def test_promote_registers_sets_the_alias_refuses_a_worse_run_unless_forced_and_predict_uses_it(trained, trained_copy):
    repo, first = trained_copy, trained.run_id
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    score = client.get_run(first).data.metrics["dev/f1_macro"]
    proc = run(["imgclf", "promote", first], repo)
    assert f"models:/imgclf@champion -> version 1 (MLflow run {first}): first @champion: dev_f1_macro " in proc.stdout
    version = client.get_model_version_by_alias("imgclf", "champion")
    assert (str(version.version), version.run_id) == ("1", first)
    assert version.tags["promoted_alias"] == "champion" and "@" in version.tags["promoted_by"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", version.tags["promoted_at"])
    # The scores evaluate logged are on the logged model too, where MLflow's model view shows them.
    model_id = client.get_run(first).outputs.model_outputs[-1].model_id
    assert {m.key for m in client.get_logged_model(model_id).metrics} >= {"dev/f1_macro", "dev/accuracy"}

    # A second run on the same data that scores lower: refused, the alias stays; --force moves it.
    second = re.search(r"\(run (\w+)\)", run(["imgclf", "rerun", first], repo).stdout).group(1)
    client.log_metric(second, "dev/f1_macro", score - 0.1, step=10_000)
    client.set_tag(second, "evaluated", "true")
    proc = run(["imgclf", "promote", second], repo, check=False)
    assert proc.returncode == 2 and error_line(proc.stderr, "promote") == (
        f"imgclf promote: error: MLflow run {second} scores dev_f1_macro {score - 0.1:.4f}, below {score:.4f} of "
        f"version 1 (run {first}), @champion now, on the same dev data; keep it, or pass --force to promote anyway")
    assert str(client.get_model_version_by_alias("imgclf", "champion").version) == "1"
    proc = run(["imgclf", "promote", second, "--force"], repo)
    version = client.get_model_version_by_alias("imgclf", "champion")
    assert (str(version.version), version.run_id) == ("2", second) and version.tags["promote_reason"].endswith("(--force)")

    image = save_image(repo / "x.png")
    out = run(["imgclf", "predict", "--model", "models:/imgclf@champion", str(image)], repo).stdout
    assert re.fullmatch(rf"{image}\t\d\t[01]\.\d{{4}}\n", out)
    proc = run(["imgclf", "predict", "--model", "models:/imgclf@nope", str(image)], repo, check=False)
    assert proc.returncode == 2 and "models:/imgclf@nope: " in error_line(proc.stderr, "predict")


def test_a_run_that_was_never_evaluated_is_not_promoted(trained, trained_copy):
    client = MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}")
    client.set_tag(trained.run_id, "evaluated", "false")
    proc = run(["imgclf", "promote", trained.run_id], trained_copy, check=False)
    assert proc.returncode == 2 and error_line(proc.stderr, "promote") == (
        f"imgclf promote: error: MLflow run {trained.run_id} has no final dev_f1_macro (its evaluate stage did not "
        "finish); evaluate it first (`dvc repro`), or pick an evaluated run in `mlflow ui`")


def test_a_model_name_with_quotes_is_registered_found_again_and_promoted(trained, trained_copy):
    # the registry's search filter was built by string formatting: a name with ' broke it
    repo, first, name = trained_copy, trained.run_id, "o'brien \"x\" model"
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run(["imgclf", "promote", first, "--name", name], repo)
    assert client.get_model_version_by_alias(name, "champion").run_id == first
    run(["imgclf", "promote", first, "--name", name, "--alias", "prod"], repo)  # found, not registered again
    assert [str(v.version) for v in client.search_model_versions(f"run_id = '{first}'")] == ["1"]
    assert client.get_model_version_by_alias(name, "prod").run_id == first


def test_a_run_evaluated_on_other_data_is_refused_unless_forced(trained, trained_copy):
    # a smoke run (data.max_train_samples) scored on other data replaced the champion without --force
    repo, first = trained_copy, trained.run_id
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run(["imgclf", "promote", first], repo)
    original = client.get_run(first)
    tags = {"evaluated": "true", "data_digest": "0" * 64}
    smoke = client.create_run(original.info.experiment_id, tags=tags).info.run_id
    # better, on other data; logged under the name runs had before #43, which promote reads as well
    client.log_metric(smoke, "dev_f1_macro", original.data.metrics["dev/f1_macro"] + 0.1)
    client.log_outputs(smoke, [LoggedModelOutput(original.outputs.model_outputs[-1].model_id, 0)])
    client.set_terminated(smoke)
    proc = run(["imgclf", "promote", smoke], repo, check=False)
    assert proc.returncode == 2 and error_line(proc.stderr, "promote") == (
        f"imgclf promote: error: MLflow run {smoke} was evaluated on other data (data_digest 000000000000) than "
        f"version 1 (run {first}, {original.data.tags['data_digest'][:12]}), @champion now: their dev_f1_macro "
        "cannot be compared; pass --force to promote it anyway")
    assert client.get_model_version_by_alias("imgclf", "champion").run_id == first
    run(["imgclf", "promote", smoke, "--force"], repo)
    version = client.get_model_version_by_alias("imgclf", "champion")
    # the smoke run shares the first run's logged model, so the new version is that model's (run_id: the first)
    assert str(version.version) == "2" and version.tags["promote_reason"].endswith("(not compared, --force)")
