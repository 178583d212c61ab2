"""A DVC remote: push the pipeline's cached outputs, lose cache and outputs, pull, and nothing needs rerunning."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ALWAYS_RUN, dvc_status, run, stages_run

pytestmark = pytest.mark.e2e

# The cached outputs of dvc.yaml (the `cache: false` ones live in git, like dvc.lock).
CACHED = ("data/prepared", "models/model.keras", "reports/loss.png", "reports/confusion_matrix.png")


def cached_files(repo: Path) -> dict[str, bytes]:
    """Every file of the cached outputs -> its bytes."""
    files = {}
    for out in CACHED:
        for path in [repo / out] if (repo / out).is_file() else sorted((repo / out).rglob("*")):
            files[path.relative_to(repo).as_posix()] = path.read_bytes()
    return files


def test_push_then_pull_into_an_empty_cache_leaves_nothing_to_rerun(trained_copy, tmp_path):
    repo_copy = trained_copy  # after the session's `dvc exp run` with TINY
    before = cached_files(repo_copy)
    assert "data/prepared/x_train.npy" in before and "models/model.keras" in before
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "--default", "shared", str(remote)], repo_copy)
    assert "files pushed" in run(["dvc", "push"], repo_copy).stdout
    assert any(remote.rglob("*")), "the remote is empty after dvc push"

    shutil.rmtree(repo_copy / ".dvc" / "cache")
    for out in CACHED:
        target = repo_copy / out
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert "deleted" in run(["dvc", "status"], repo_copy).stdout

    run(["dvc", "pull"], repo_copy)
    assert cached_files(repo_copy) == before
    again = run(["dvc", "repro"], repo_copy)
    assert stages_run(again.stdout) == list(ALWAYS_RUN), again.stdout
    assert dvc_status(repo_copy) == ALWAYS_RUN
