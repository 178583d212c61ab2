"""The train stage's code (imgclf.code) and what `git_dirty` means: that code differs from the commit."""

from __future__ import annotations

from imgclf.code import uncommitted
from imgclf.tracking import git_facts


def test_git_dirty_means_the_training_code_differs_from_its_commit(repo_copy):
    facts = git_facts(repo_copy)
    assert facts["git_dirty"] == "False" and len(facts["git_commit"]) == 40
    # What DVC and the user's params loop rewrite is not code: a fresh clone's `dvc repro` stays clean.
    (repo_copy / "params.yaml").write_text((repo_copy / "params.yaml").read_text() + "\n")
    (repo_copy / "dvc.lock").write_text("schema: '2.0'\n")
    (repo_copy / "README.md").unlink()
    assert git_facts(repo_copy) == facts
    # A new family module is code, tracked or not; so is an edit of the lockfile.
    (repo_copy / "src/imgclf/families/mine.py").write_text("")
    with open(repo_copy / "requirements.lock", "a") as fh:
        fh.write("# edited\n")
    assert uncommitted(repo_copy) == ["requirements.lock", "src/imgclf/families/mine.py"]
    assert git_facts(repo_copy) == facts | {"git_dirty": "True",
                                            "git_dirty_files": "requirements.lock, src/imgclf/families/mine.py"}


def test_outside_git_it_is_unknown(tmp_path):
    assert git_facts(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
