"""The train stage's code (imgclf.files.code) and what `git_dirty` means: that code differs from the commit."""

from __future__ import annotations

import shutil

from conftest import REPO
from imgclf.files.code import code_digest, uncommitted
from imgclf.tracking.context import git_facts


def test_git_dirty_means_the_training_code_differs_from_its_commit(repo_copy):
    facts = git_facts(repo_copy)
    assert facts["git_dirty"] == "False" and len(facts["git_commit"]) == 40
    # What DVC and the user's params loop rewrite is not code: a fresh clone's `dvc repro` stays clean.
    (repo_copy / "params.yaml").write_text((repo_copy / "params.yaml").read_text() + "\n")
    (repo_copy / "dvc.lock").write_text("schema: '2.0'\n")
    (repo_copy / "README.md").unlink()
    assert git_facts(repo_copy) == facts
    # A new family module is code, tracked or not; so is an edit of the lockfile.
    (repo_copy / "src/imgclf/training/families/mine.py").write_text("")
    with open(repo_copy / "requirements.lock", "a") as fh:
        fh.write("# edited\n")
    assert uncommitted(repo_copy) == ["requirements.lock", "src/imgclf/training/families/mine.py"]
    assert git_facts(repo_copy) == facts | {"git_dirty": "True",
                                            "git_dirty_files": "requirements.lock, src/imgclf/training/families/mine.py"}


def test_outside_git_it_is_unknown(tmp_path):
    assert git_facts(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_the_code_digest_hashes_the_train_stages_code_that_dvc_yaml_lists(tmp_path):
    package = tmp_path / "src" / "imgclf"
    shutil.copytree(REPO / "src" / "imgclf", package, ignore=shutil.ignore_patterns("__pycache__"))
    dvc_yaml = shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    base = code_digest(package, dvc_yaml)
    assert base == code_digest()  # where it lies does not count, only the files under the package
    (package / "evaluate.py").write_text("# not the train stage's code\n")
    assert code_digest(package, dvc_yaml) == base
    (package / "training" / "families" / "mine.py").write_text("# a new family\n")
    with_family = code_digest(package, dvc_yaml)
    (package / "train.py").write_text((package / "train.py").read_text() + "# changed\n")
    assert len({base, with_family, code_digest(package, dvc_yaml)}) == 3
    whole = code_digest(package, tmp_path / "absent.yaml")  # no dvc.yaml: every module counts
    (package / "evaluate.py").write_text("# changed again\n")
    assert code_digest(package, tmp_path / "absent.yaml") != whole
