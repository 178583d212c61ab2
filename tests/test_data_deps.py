"""DVC sees the images (dvc.yaml's fingerprint stage and prepare's data/raw dependency), with the real DVC:
added, changed or removed images rerun prepare, inside the repo and outside it; an untouched or a touched but
identical source reruns nothing."""

from __future__ import annotations

import os

import pytest

from conftest import dvc_status, run, stages_run, write_params
from fakes import make_folder, save_image

pytestmark = pytest.mark.e2e


def repro_prepare(repo) -> list[str]:
    return stages_run(run(["dvc", "repro", "prepare"], repo).stdout)


def edits(images):
    """Add an image, change one, remove one: each must rerun prepare."""
    yield lambda: save_image(images / "train/cat/new.png")
    yield lambda: save_image(images / "train/dog/0001.png", color=(9, 9, 9))
    yield lambda: (images / "train/cat/0001.png").unlink()


@pytest.mark.long(40)
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_images_added_changed_or_removed_rerun_prepare_and_nothing_else_does(repo_copy, tmp_path, where):
    if where == "inside":  # the documented way: a folder under data/raw, tracked with `dvc add`
        images = make_folder(repo_copy / "data/raw/pets", classes=("cat", "dog"), n_train=6)
        run(["dvc", "add", "data/raw/pets"], repo_copy)
        run(["git", "add", "data/raw"], repo_copy)
        run(["git", "commit", "-qm", "images"], repo_copy)
        path = "data/raw/pets"
    else:
        images = make_folder(tmp_path / "pets", classes=("cat", "dog"), n_train=6)
        path = str(images)
    write_params(repo_copy, {"data.dataset": "folder", "data.path": path, "data.dev_fraction": "0.25"})
    assert repro_prepare(repo_copy) == ["fingerprint", "prepare"]
    assert repro_prepare(repo_copy) == ["fingerprint"]  # untouched: prepare is not rerun
    os.utime(images / "train/cat/0002.jpg", (1, 1))
    assert repro_prepare(repo_copy) == ["fingerprint"]  # touched, same bytes
    assert "prepare" not in dvc_status(repo_copy)
    for edit in edits(images):
        edit()
        if where == "inside":  # DVC hashes data/raw itself: `dvc status` names prepare before any repro
            assert "prepare" in dvc_status(repo_copy) and "data/raw/pets.dvc" in dvc_status(repo_copy)
        assert repro_prepare(repo_copy) == ["fingerprint", "prepare"]
        assert repro_prepare(repo_copy) == ["fingerprint"]
