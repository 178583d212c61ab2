"""The folder source: train/<class>/ image trees, odd images converted, bad ones refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fakes import make_folder, make_params, save_image
from imgclf.errors import DataError
from imgclf.prepare import prepare
from imgclf.prepared import load_prepared
from imgclf.sources.folder import load_folder


def test_folder_prepare_with_test_and_odd_images(tmp_path):
    root = make_folder(tmp_path / "imgs", n_train=10, n_test=2)
    save_image(root / "train" / "cat" / "gray.png", mode="L")
    save_image(root / "train" / "dog" / "alpha.png", mode="RGBA")
    save_image(root / "train" / "dog" / "palette.gif", mode="P", fmt="GIF")
    save_image(root / "train" / "frog" / "BIG.JPEG", size=(64, 48))
    save_image(root / "train" / "frog" / "red.BMP", color=(255, 0, 0))
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")
    manifest = prepare(make_params("folder", str(root), dev_fraction=0.25), tmp_path / "out")
    splits, _ = load_prepared(tmp_path / "out")
    assert manifest["classes"] == ["cat", "dog", "frog"]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["dev"]["count"] == 35
    assert manifest["splits"]["test"] == {"count": 6, "per_class": {"cat": 2, "dog": 2, "frog": 2}}
    source = load_folder(root)
    red = source.x[[i for i, y in enumerate(source.y) if y == 2][-1]]  # red.BMP sorts after 0009.png
    assert np.all(red == [255, 0, 0])
    assert splits["train"][0].shape[1:] == (32, 32, 3) and splits["test"][1].dtype == np.int64
    assert manifest["source"]["sha256"] == load_folder(root).info["sha256"]


def test_folder_without_test_has_no_test_split(tmp_path):
    manifest = prepare(make_params("folder", str(make_folder(tmp_path / "imgs")), 0.3), tmp_path / "out")
    assert "test" not in manifest["splits"] and not (tmp_path / "out" / "y_test.npy").exists()


def test_folder_missing_path_and_train(tmp_path):
    with pytest.raises(DataError, match="data.path is null; set data.path to a folder"):
        prepare(make_params("folder", None), tmp_path / "out")
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: not found; set data.path"):
        prepare(make_params("folder", str(tmp_path / "nope")), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty' / 'train'}: not found"):
        prepare(make_params("folder", str(tmp_path / "empty")), tmp_path / "out")


def test_folder_empty_class(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match=f"{root / 'train' / 'zebra'}: empty class folder"):
        load_folder(root)


def test_folder_non_image(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "dog" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=f"{root / 'train' / 'dog' / 'notes.txt'}: not an image.*remove it"):
        load_folder(root)


@pytest.mark.parametrize("name", ["0003.png", "0004.jpg"])
def test_folder_truncated_image(tmp_path, name):
    root = make_folder(tmp_path / "imgs")
    bad = root / "train" / "frog" / name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{bad}: unreadable or truncated image"):
        load_folder(root)


def test_folder_test_classes_must_match(tmp_path):
    root = make_folder(tmp_path / "imgs", n_test=1)
    save_image(root / "test" / "owl" / "0.png")
    with pytest.raises(DataError, match="test: class folders differ from train/ \\(owl\\)"):
        load_folder(root)


@pytest.mark.parametrize("kind", ["broken-symlink", "symlink-loop"])
def test_folder_unreadable_image_is_one_line(tmp_path, kind):
    root = make_folder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "link.png"
    bad.symlink_to(bad if kind == "symlink-loop" else tmp_path / "gone.png")
    with pytest.raises(DataError, match=f"{bad}: unreadable .*; fix or remove it"):
        load_folder(root)


def test_folder_unreadable_subfolder_is_refused_not_skipped(tmp_path, monkeypatch):
    # chmod 000 does not stop root, so the refusal a non-root user would get is simulated
    root = make_folder(tmp_path / "imgs")
    locked = root / "train" / "cat" / "more"
    save_image(locked / "x.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"{locked}: unreadable \\(Permission denied\\)"):
        load_folder(root)
