"""`imgclf rerun` at the run's own commit (imgclf.rerun's rerun_at_commit, files/at_commit.py's worktree): its code,
data and params in a temporary worktree, the workspace untouched; refusals in one line; Ctrl-C leaves no worktree
behind and the new run KILLED."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, error_line, pipeline_env, run, set_args, wait_until
from fakes import snapshot
from imgclf.errors import ImgclfError
from imgclf.files.at_commit import worktree

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
    client = MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}")
    experiment = client.get_run(trained.run_id).info.experiment_id

    def reruns():
        return client.search_runs([experiment], f"tags.rerun_of = '{trained.run_id}'")

    proc = subprocess.Popen(["imgclf", "rerun", trained.run_id], cwd=trained_copy, env=pipeline_env(TMPDIR=str(tmp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # the child has opened the new run (its params are logged): the Ctrl-C lands mid-training, not before
        wait_until(lambda: any(r.data.params for r in reruns()) or proc.poll() is not None, 120,
                   "the rerun's training to log its params")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out + err
    assert worktrees(trained_copy) == [str(trained_copy)] and not list(tmp.glob("imgclf-rerun-*"))
    assert [r.info.status for r in reruns()] == ["KILLED"]  # it ran: an empty list no longer passes


def refusal(trained, repo, tmp: Path) -> str:
    """`imgclf rerun` of the trained run, refused: its one error line; checks nothing was left or started."""
    tmp.mkdir()
    proc = run(["imgclf", "rerun", trained.run_id], repo, pipeline_env(TMPDIR=str(tmp)), check=False)
    assert proc.returncode == 2 and "Retraining" not in proc.stdout, proc.stdout + proc.stderr
    assert worktrees(repo) == [str(repo)] and not list(tmp.glob("imgclf-rerun-*"))
    assert "locked" not in run(["git", "worktree", "list", "--porcelain"], repo).stdout
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert client.search_runs([client.get_run(trained.run_id).info.experiment_id],
                              f"tags.rerun_of = '{trained.run_id}'") == []
    return error_line(proc.stderr, "rerun")


@pytest.mark.parametrize("commit", ["--lock", "HEAD", "abc123"])
def test_a_git_commit_tag_that_is_not_a_commit_id_never_reaches_git(trained, trained_copy, tmp_path, commit):
    # `--lock` was taken by git as an option: HEAD checked out, and a locked worktree left behind
    MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}").set_tag(trained.run_id, "git_commit", commit)
    assert refusal(trained, trained_copy, tmp_path / "tmp") == (
        f"imgclf rerun: error: MLflow run {trained.run_id}'s git_commit tag {commit!r} is not a commit id (40 hex "
        f"digits); `imgclf rerun --current-code {trained.run_id}` retrains it with this tree's code instead")


def test_a_commit_no_longer_in_the_repository_is_refused_in_one_line(trained, trained_copy, tmp_path):
    gone = "ab" * 20
    MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}").set_tag(trained.run_id, "git_commit", gone)
    assert refusal(trained, trained_copy, tmp_path / "tmp") == (
        f"imgclf rerun: error: commit abababababab of MLflow run {trained.run_id} is not in the repository at "
        f"{trained_copy} (fatal: invalid reference: {gone}); `git fetch` it, or rerun from a clone that has it")


def test_code_that_differs_from_the_run_s_code_digest_is_refused_in_one_line(trained, trained_copy, tmp_path):
    client = MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}")
    client.set_tag(trained.run_id, "code_digest", "f" * 64)
    line = refusal(trained, trained_copy, tmp_path / "tmp")
    commit = client.get_run(trained.run_id).data.tags["git_commit"][:12]
    assert line.startswith(f"imgclf rerun: error: the train stage's code at commit {commit} (sha256 ")
    assert line.endswith(f") is not the code MLflow run {trained.run_id} trained with (ffffffffffff): it cannot be "
                         f"reproduced exactly; `imgclf rerun --current-code {trained.run_id}` retrains it with this "
                         "tree's code instead")


def test_data_in_neither_the_workspace_nor_the_dvc_cache_is_refused_in_one_line(trained, trained_copy, tmp_path):
    repo = trained_copy
    run(["imgclf", *set_args(TINY | {"seed": "7"}), "prepare"], repo)  # other data in the workspace
    shutil.rmtree(repo / ".dvc/cache")  # and the run's gone from the cache
    digest = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(trained.run_id).data.tags["data_digest"]
    assert refusal(trained, repo, tmp_path / "tmp") == (
        f"imgclf rerun: error: the data the run trained on (digest {digest[:12]}) is neither in data/prepared nor in "
        "the DVC cache; `dvc pull` it, or prepare it with the run's params.yaml (in its artifacts)")


@pytest.mark.long(40)
def test_a_relative_tracking_uri_reaches_the_child_in_the_worktree_as_the_same_store(trained, trained_copy, tmp_path):
    # `export MLFLOW_TRACKING_URI=sqlite:///mlflow.db` (docs/serving.md): the child trained in the temporary
    # worktree against an empty store there
    env = pipeline_env(MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    proc = run(["imgclf", "rerun", trained.run_id], trained_copy, env)
    assert "MATCH: weights sha256" in proc.stdout
    client = MlflowClient(f"sqlite:///{trained_copy / 'mlflow.db'}")
    (rerun,) = client.search_runs([client.get_run(trained.run_id).info.experiment_id],
                                  f"tags.rerun_of = '{trained.run_id}'")
    assert rerun.info.status == "FINISHED" and rerun.data.tags["reproduced"] == "true"


def git_repo(path: Path, files: dict[str, str]) -> str:
    """A git repository at `path` with `files` committed; its commit."""
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    run(["git", "init", "-q"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "x"], path)
    return run(["git", "rev-parse", "HEAD"], path).stdout.strip()


def test_the_worktree_has_the_commit_s_submodules_and_refuses_an_option_as_a_commit(tmp_path, monkeypatch):
    for key, value in pipeline_env(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="protocol.file.allow",
                                   GIT_CONFIG_VALUE_0="always").items():
        monkeypatch.setenv(key, value)  # a local submodule: git refuses file:// clones unless told
    git_repo(tmp_path / "lib", {"lib.py": "VALUE = 1\n"})
    git_repo(tmp_path / "main", {"a.py": ""})
    run(["git", "submodule", "add", "-q", str(tmp_path / "lib"), "vendor/lib"], tmp_path / "main", dict(os.environ))
    run(["git", "commit", "-qm", "with a submodule"], tmp_path / "main", dict(os.environ))
    commit = run(["git", "rev-parse", "HEAD"], tmp_path / "main").stdout.strip()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with worktree(tmp_path / "main", commit, "r1") as tree:
        assert (tree / "vendor/lib/lib.py").read_text() == "VALUE = 1\n"
    assert worktrees(tmp_path / "main") == [str(tmp_path / "main")]
    with pytest.raises(ImgclfError, match="git_commit tag '--lock' is not a commit id"):
        with worktree(tmp_path / "main", "--lock", "r1"):
            pass
    assert worktrees(tmp_path / "main") == [str(tmp_path / "main")]
