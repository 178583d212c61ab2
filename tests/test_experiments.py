"""The report's variants: each preset is a params override with a hand-checked size, run via DVC's queue."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, error_line, finished_runs, kill_processes_in, pipeline_env, run, set_args
from conftest import store_in, wait_until, write_params
from imgclf.config import apply_overrides, validate
from imgclf.experiments.presets import PRESETS, REPORT_VARIANTS
from imgclf.experiments.table import latest_runs, markdown, summarize
from imgclf.training.families.report import build_model

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def dense(n_in, n_out):
    return n_in * n_out + n_out


FC = dense(2048, 2048) + dense(2048, 2048) + dense(2048, 10)
VGG = conv(3, 3, 64) + conv(3, 64, 64) + conv(3, 64, 128) + conv(3, 128, 128)
EXPECTED = {
    "report_final": VGG + conv(3, 128, 256) + conv(3, 256, 256) + conv(3, 256, 512) + 2 * conv(3, 512, 512) + FC,
    # the 256 block is gone but its pool stays: 32 -> 16 -> 8 -> 4 -> 2, flatten 2*2*512
    "no_256": VGG + conv(3, 128, 512) + 2 * conv(3, 512, 512) + FC,
    "no_512": VGG + conv(3, 128, 256) + conv(3, 256, 256) + conv(3, 256, 512) + conv(3, 512, 512) + FC,
    "single_fc": VGG + conv(3, 128, 256) + conv(3, 256, 256) + conv(3, 256, 512) + 2 * conv(3, 512, 512)
    + dense(2048, 10),
    "shallow": conv(5, 3, 64) + conv(16, 64, 128) + dense(8 * 8 * 128, 10),
    "shallow_dropout": conv(5, 3, 64) + conv(16, 64, 128) + dense(8 * 8 * 128, 10),
}


REPORT_FINAL_SIZE = 15_458_378  # the report's own count of its final net's parameters


@pytest.mark.parametrize("variant", REPORT_VARIANTS)
def test_each_preset_builds_the_hand_computed_net(variant):
    params = validate(apply_overrides(copy.deepcopy(PARAMS), [f"{k}={v}" for k, v in PRESETS[variant].overrides.items()]))
    built = build_model(params["model"], params["train"], 10).count_params()
    assert built == EXPECTED[variant]
    if variant == "report_final":  # the built net, not only the hand computation, has the report's size
        assert built == REPORT_FINAL_SIZE


@pytest.mark.long(225)
@pytest.mark.e2e
def test_every_variant_runs_through_the_dvc_queue_into_the_repo_store(repo_copy):
    smoke = {"train.training_epochs": "1", "data.max_train_samples": "100"}
    proc = run(["imgclf", "experiments", "--jobs", "2", *set_args(smoke)], repo_copy, timeout=900)
    table = (repo_copy / "reports/experiments.md").read_text()
    assert table in proc.stdout
    for variant in REPORT_VARIANTS:  # the default: the report's six, not `fast`
        preset = PRESETS[variant]
        row = next(line for line in table.splitlines() if line.startswith(f"| {variant} |"))
        assert " | 51 | " in row and row.endswith(f"| {' / '.join(f'{f:.3f}' for f in preset.report_f1)} |")
    assert (repo_copy / "reports/experiments.png").read_bytes()[:4] == b"\x89PNG"

    # Queued runs happen in .dvc/tmp/exps copies, yet land in the repo's own default store, two at a
    # time (--jobs 2) without a lost or half-logged run.
    assert not list((repo_copy / ".dvc").rglob("mlflow.db"))
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    runs = finished_runs(f"sqlite:///{repo_copy / 'mlflow.db'}", "imgclf")
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(REPORT_VARIANTS)
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.metrics["epochs_run"] == 1
        assert 0 <= r.data.metrics["dev/f1_macro"] <= 1
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1]
    assert any(b.info.start_time < a.info.end_time for a, b in zip(runs, runs[1:])), "no two experiments overlapped"
    shallow = next(r for r in runs if r.data.tags["variant"] == "shallow")
    assert shallow.data.params["model.kernel_size"] == "[5, 16]" and shallow.data.params["train.training_epochs"] == "1"

    again = run(["imgclf", "experiments", "--table"], repo_copy)
    assert table in again.stdout and "Queued" not in again.stdout


@pytest.mark.e2e
def test_dvc_exp_run_with_a_preset_logs_the_expanded_params_and_explicit_keys_win(repo_copy):
    tiny = {"model.fast.widths": "[8, 16, 16]", "model.fast.whiten_images": "100", "train.batch_size": "32",
            "train.training_epochs": "2", "data.max_train_samples": "200"}  # the last three are fast_muon's too
    run(["dvc", "exp", "run", "-S", "preset=fast_muon", *set_args(tiny)], repo_copy)
    (r,) = finished_runs(f"sqlite:///{repo_copy / 'mlflow.db'}", "imgclf")
    logged = r.data.params
    assert logged["preset"] == "fast_muon" and r.data.tags["variant"] == "fast_muon"
    assert {k: logged[k] for k in ("model.arch", "model.fast.optimizer", "model.fast.lookahead_every",
                                   "train.early_stopping.monitor", "evaluate.tta", "train.mixed_precision")} == {
        "model.arch": "fast", "model.fast.optimizer": "muon", "model.fast.lookahead_every": "0",
        "train.early_stopping.monitor": "none", "evaluate.tta": "flip_translate", "train.mixed_precision": "auto"}
    assert (logged["train.batch_size"], logged["train.training_epochs"]) == ("32", "2")  # -S won
    assert r.data.metrics["epochs_run"] == 2 and r.data.tags["evaluated"] == "true"
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["preset"] == "fast_muon"  # DVC sees the switch change
    assert lock["evaluate"]["params"]["params.yaml"]["preset"] == "fast_muon"


def pids(folder, pattern: str) -> list[int]:
    """The pids in dvc-task's process info files (skipping one still being written)."""
    found = []
    for info in folder.glob(pattern):
        try:
            found.append(json.loads(info.read_text())["pid"])
        except ValueError:
            pass
    return found


@pytest.mark.long(81)
@pytest.mark.e2e
def test_a_killed_queue_worker_is_reported_and_replaced_instead_of_waited_on(repo_copy):
    """`dvc exp run --run-all` waits forever here (treeverse/dvc#10398); ours restarts the workers."""
    tiny = TINY | {"train.training_epochs": "1"}
    write_params(repo_copy, tiny)
    run(["git", "commit", "-qam", "tiny"], repo_copy)
    # The preset's own net and 15 epochs would win over params.yaml: the user's -S win over the preset. The
    # queue's handling of a dead worker is the subject here, not what the experiment trains.
    proc = subprocess.Popen(["imgclf", "experiments", "--variants", "shallow", "--seeds", "1", "2", *set_args(tiny)],
                            cwd=repo_copy, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        started = wait_until(lambda: pids(repo_copy / ".dvc/tmp/exps/run", "*/*.json"), 300,
                             "the first experiment to start")
        # the worker, and the experiment's `dvc exp exec-run` under it
        for pid in pids(repo_copy / ".dvc/tmp/exps/celery", "dvc-exp-worker-*.json") + started:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=400)
    finally:
        proc.kill()
        kill_processes_in(repo_copy)  # seed 1's `imgclf train`, orphaned by the kill: DVC detached it from us
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert "[shallow seed 1] lost (DVC experiment" in out
    assert "no DVC queue worker is alive and 1 experiment(s) wait; starting workers again" in out
    assert "[shallow seed 2] success (DVC experiment" in out
    assert "imgclf experiments: shallow seed 1: lost (" in err
    row = next(line for line in (repo_copy / "reports/experiments.md").read_text().splitlines() if "| shallow |" in line)
    assert "| 2 |" in row or "| 1, 2 |" in row  # seed 2's run, and seed 1's if its orphaned training still finished


class FakeRun:
    """What summarize() reads of an MLflow run."""

    def __init__(self, seed: int, f1: float, collapsed: bool):
        self.data = type("Data", (), {})()
        self.data.params = {"seed": str(seed)}
        self.data.metrics = {"dev_f1_macro": f1, "epochs_run": 6.0, "train_seconds": 10.0}
        self.data.tags = {"collapsed": str(collapsed).lower(), "early_stopped": "False"}
        self.info = type("Info", (), {"run_id": f"{seed:032d}"})()


def test_collapsed_runs_are_marked_and_left_out_of_the_second_mean():
    runs = [FakeRun(51, 0.018, True), FakeRun(52, 0.70, False), FakeRun(53, 0.74, False)]
    (line,) = [r for r in markdown([summarize("report_final", runs)]).splitlines() if r.startswith("| report_final")]
    assert line.startswith("| report_final | 51, 52, 53 | 0.486 ± 0.406 | 0.720 ± 0.028 | 1/3 (51) | 6, 6, 6 |")
    (line,) = [r for r in markdown([summarize("fast", [FakeRun(51, 0.1, True)])]).splitlines() if "| fast |" in r]
    assert "| 0.100 ± 0.000 | — | 1/1 (51) |" in line and line.endswith("| — |")  # no report number for fast


def test_early_stops_are_counted_from_metrics_and_from_the_params_and_tags_of_runs_logged_before_43():
    new_stopped, new_ran_all = FakeRun(51, 0.7, False), FakeRun(52, 0.7, False)
    for fake, value in ((new_stopped, 1.0), (new_ran_all, 0.0)):
        del fake.data.tags["early_stopped"]  # a metric now; the tag may go one day
        fake.data.metrics["early_stopped"] = value
    old_param = FakeRun(53, 0.7, False)
    old_param.data.params["early_stopped"] = "True"
    old_tag = FakeRun(54, 0.7, False)
    old_tag.data.tags["early_stopped"] = "True"
    runs = [new_stopped, new_ran_all, old_param, old_tag, FakeRun(55, 0.7, False)]
    assert summarize("report_final", runs)["early_stopped"] == 3


def test_the_table_counts_only_evaluated_runs(tmp_path, monkeypatch, empty_store):
    uri = store_in(tmp_path, empty_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "mlruns").as_uri())

    def finished(seed: int, f1: float, metrics: dict | None = None, score: str = "dev_f1_macro", **tags) -> str:
        run_id = client.create_run(exp, tags={"variant": "fast", **tags}).info.run_id
        client.log_param(run_id, "seed", str(seed))
        for key, value in {score: f1, **(metrics or {})}.items():
            client.log_metric(run_id, key, value, step=3)
        client.set_terminated(run_id)
        return run_id

    evaluated = finished(51, 0.9, evaluated="true")
    finished(51, 0.5)  # newer, never evaluated: its evaluate failed, or an `imgclf rerun` of the variant
    legacy = finished(52, 0.8, {"dev_f1_per_class/cat": 0.8})  # evaluated before the tag existed
    finished(53, 0.4)
    current = finished(54, 0.7, {"test/f1_macro": 0.6}, score="dev/f1_macro", evaluated="true")  # keys since #43
    runs = latest_runs("t", None, None)["fast"]
    assert [r.info.run_id for r in runs] == [evaluated, legacy, current]
    assert summarize("fast", runs)["f1"] == pytest.approx((0.8, 0.1))
    assert summarize("fast", runs)["test_f1_macro"] is None  # only one of the three runs was scored on test


@pytest.mark.e2e  # the console script in its own process (test_cli checks the same message in-process)
def test_unknown_variant_is_refused(tmp_path):
    proc = run(["imgclf", "--params", str(REPO / "params.yaml"), "experiments", "--variants", "deep"], tmp_path,
               check=False)
    assert proc.returncode == 2 and "unknown variant(s) deep; choose from report_final" in proc.stderr


@pytest.mark.e2e
def test_an_untracked_source_file_is_refused_before_anything_is_queued(repo_copy):
    """DVC's queue copies tracked and staged changes into an experiment, never untracked files."""
    (repo_copy / "src/imgclf/training/families/mine.py").write_text("")
    proc = run(["imgclf", "experiments", "--variants", "fast"], repo_copy, check=False)
    assert proc.returncode == 2
    assert error_line(proc.stderr, "experiments") == (
        "imgclf experiments: error: src/imgclf/training/families/mine.py: not tracked by git, so DVC's queue would run the "
        "experiments without them; `git add` them (staged files go with a queued experiment) or commit them, "
        "then rerun")
    assert "No experiment tasks in the queue." in run(["dvc", "queue", "status"], repo_copy).stdout


@pytest.mark.long(200)
@pytest.mark.e2e
def test_a_2x2_grid_queues_four_experiments_whose_mlflow_runs_carry_the_swept_params(repo_copy):
    """docs/experiments.md's sweep as a person types it: DVC's grid syntax, the queue started by hand, each
    experiment an MLflow run of the repository's store with its swept params."""
    grid = ["-S", "train.learning_rate=0.001,0.0005", "-S", "seed=51,52"]
    run(["dvc", "exp", "run", "--queue", *grid, *set_args(TINY | {"train.training_epochs": "1"})], repo_copy)
    assert run(["dvc", "queue", "status"], repo_copy).stdout.count("Queued") == 4
    run(["dvc", "queue", "start", "--jobs", "1"], repo_copy)
    wait_until(lambda: run(["dvc", "queue", "status"], repo_copy).stdout.count("Success") == 4, 900,
               "four successful experiments", interval=5)
    runs = [r for r in finished_runs(f"sqlite:///{repo_copy / 'mlflow.db'}", "imgclf")
            if r.data.tags.get("evaluated") == "true"]
    swept = sorted((r.data.params["train.learning_rate"], r.data.params["seed"]) for r in runs)
    assert swept == [("0.0005", "51"), ("0.0005", "52"), ("0.001", "51"), ("0.001", "52")]
