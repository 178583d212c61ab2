"""`imgclf rerun` at the run's own commit (imgclf.at_commit): its code, data and params in a temporary worktree,
the workspace untouched; refusals in one line; Ctrl-C leaves no worktree behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, error_line, pipeline_env, run, set_args, wait_until
from fakes import snapshot

pytestmark = pytest.mark.e2e


def workspace(repo) -> dict[str, bytes]:
    """The files a rerun must leave as they are: all but git's, DVC's and MLflow's own stores."""
    skip = (".git/", ".dvc/tmp/", "mlruns/", "mlflow.db")
    return {k: v for k, v in snapshot(repo).items() if not k.startswith(skip)}


def worktrees(repo) -> list[str]:
    out = run(["git", "worktree", "list", "--porcelain"], repo).stdout
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]


def head(repo, rev: str = "HEAD") -> str:
    return run(["git", "rev-parse", rev], repo).stdout.strip()


@pytest.mark.long(60)
def test_a_rerun_after_the_training_code_changed_trains_at_the_runs_commit_and_touches_nothing(trained, trained_copy,
                                                                                            tmp_path):
    repo, tmp = trained_copy, tmp_path / "tmp"
    tmp.mkdir()
    weights = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(trained.run_id).data.tags["weights_sha256"]
    numerics = repo / "src/imgclf/training/numerics.py"
    numerics.write_text(numerics.read_text().replace("set_random_seed(seed)", "set_random_seed(seed + 1)"))
    run(["git", "commit", "-qam", "train with another seed"], repo)
    env = pipeline_env(TMPDIR=str(tmp), PYTHONPATH=str(repo / "src"))  # this tree's code, as its own install
    before, commit = workspace(repo), head(repo, "HEAD~2")  # the run's commit: before the fixture's own commit

    proc = run(["imgclf", "rerun", trained.run_id], repo, env)
    assert f"at commit {commit[:12]}" in proc.stdout and "on its data from data/prepared" in proc.stdout
    assert f"MATCH: weights sha256 {weights}" in proc.stdout
    assert workspace(repo) == before and worktrees(repo) == [str(repo)]
    assert not list(tmp.glob("imgclf-rerun-*"))

    # With this tree's code: the weights differ, and the report names the commit and the code that differ.
    proc = run(["imgclf", "rerun", "--current-code", trained.run_id], repo, env, check=False)
    assert proc.returncode == 1 and "DIFF: weights sha256" in proc.stdout
    assert f"  environment differs: git_commit: {commit} -> {head(repo)}" in proc.stdout
    assert "  environment differs: code_digest: " in proc.stdout

    # Other data in the workspace: the run's own comes back from the DVC cache, into the worktree only.
    run(["imgclf", *set_args(TINY | {"seed": "7"}), "prepare"], repo, env)
    before = workspace(repo)
    proc = run(["imgclf", "rerun", trained.run_id], repo, env)
    assert "on its data from the DVC cache" in proc.stdout and f"MATCH: weights sha256 {weights}" in proc.stdout
    assert workspace(repo) == before and worktrees(repo) == [str(repo)]


def test_a_run_of_uncommitted_code_is_refused_in_one_line(trained, trained_copy):
    client = MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}")
    client.set_tag(trained.run_id, "git_dirty", "True")
    client.set_tag(trained.run_id, "git_dirty_files", "src/imgclf/training/families/mine.py")
    proc = run(["imgclf", "rerun", trained.run_id], trained_copy, check=False)
    assert proc.returncode == 2 and "Training" not in proc.stdout
    assert error_line(proc.stderr, "rerun") == (
        f"imgclf rerun: error: MLflow run {trained.run_id} trained on uncommitted code (src/imgclf/training/families/mine.py): "
        f"it cannot be reproduced exactly; `imgclf rerun --current-code {trained.run_id}` retrains it with this "
        "tree's code instead")


def test_ctrl_c_during_a_rerun_leaves_no_worktree_and_no_running_run(trained, trained_copy, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(["imgclf", "rerun", trained.run_id], cwd=trained_copy, env=pipeline_env(TMPDIR=str(tmp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: any(tmp.glob("imgclf-rerun-*/tree/data/prepared")) or proc.poll() is not None, 60,
                   "the rerun's worktree")
        time.sleep(1.0)  # the training process is starting in the worktree
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out + err
    assert worktrees(trained_copy) == [str(trained_copy)] and not list(tmp.glob("imgclf-rerun-*"))
    client = MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}")
    reruns = client.search_runs([client.get_run(trained.run_id).info.experiment_id],
                                f"tags.rerun_of = '{trained.run_id}'")
    assert [r.info.status for r in reruns] in ([], ["KILLED"])
