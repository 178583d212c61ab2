"""The folder source: train/<class>/ image trees, odd images converted, bad ones refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from fakes import make_folder, make_params, save_image, snapshot
from imgclf.errors import DataError
from imgclf.data.images import load_image
from imgclf.prepare import prepare, write_prepared
from imgclf.files.prepared_reader import load_prepared
from imgclf.data.sources import Source
from imgclf.data.sources.folder import load_folder
from imgclf.data.decode_pool import Workers


def in_memory(images) -> np.ndarray:
    """A folder split's images decoded whole, file by file: what the folder source used to return."""
    return np.stack([load_image(path, images.size) for path in images.files])


def file_digest(root: Path) -> str:
    """The folder source's digest as it always was: sha256 over the sorted "relpath:sha256" of every file."""
    lines = sorted(f"{p.relative_to(root).as_posix()}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
                   for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def with_workers(params: dict, workers: int) -> dict:
    params["data"]["workers"] = workers
    return params


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
    (tmp_path / "red.raw").write_bytes(b"")  # decode_into writes where it is told, in a file that exists
    assert list(source.x.decode_into(tmp_path / "red.raw", 0, np.array([len(source.y) - 1]), Workers(1))) == [1]
    red = np.fromfile(tmp_path / "red.raw", np.uint8).reshape(32, 32, 3)  # red.BMP sorts after 0009.png
    assert np.all(red == [255, 0, 0]) and source.y[-1] == 2
    assert splits["train"][0].shape[1:] == (32, 32, 3) and splits["test"][1].dtype == np.int64
    assert manifest["source"]["sha256"] == file_digest(root) == load_folder(root).finish(Workers(1))["sha256"]


@pytest.mark.parametrize("max_train_samples", [None, 40])
def test_any_worker_count_writes_the_bytes_the_whole_in_memory_folder_does(tmp_path, max_train_samples):
    """1 or 2 workers, and the folder decoded whole into an array first (the source as it was): the same
    data/prepared, byte for byte, manifest included; files left out by max_train_samples still in its digest."""
    root = make_folder(tmp_path / "imgs", n_train=20, n_test=3, size=(40, 36))
    save_image(root / "train" / "dog" / "alpha.png", mode="RGBA")
    params = make_params("folder", str(root), 0.25, max_train_samples, image_size=24)
    for workers in (1, 2):
        prepare(with_workers(params, workers), tmp_path / f"workers{workers}")
    source = load_folder(root, 24)
    whole = Source(in_memory(source.x), source.y, source.classes, {"path": str(root), "sha256": file_digest(root)},
                   (in_memory(source.test[0]), source.test[1]))
    write_prepared(whole, params, tmp_path / "whole")
    assert snapshot(tmp_path / "workers1") == snapshot(tmp_path / "workers2") == snapshot(tmp_path / "whole")
    assert load_prepared(tmp_path / "whole")[0]["train"][0].shape[0] == (max_train_samples or 61) * 3 // 4


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


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", ["0003.png", "0004.jpg"])
def test_folder_truncated_image(tmp_path, name, workers):
    root = make_folder(tmp_path / "imgs")
    bad = root / "train" / "frog" / name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=f"^{bad}: unreadable or truncated image") as error:
        prepare(with_workers(make_params("folder", str(root)), workers), tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


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
        prepare(with_workers(make_params("folder", str(root)), 2), tmp_path / "out")


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


def test_a_fifo_named_like_an_image_is_refused_before_it_is_read(tmp_path):
    """Opened blocking and read whole, a FIFO hangs prepare (nothing ever writes to it)."""
    root = make_folder(tmp_path / "imgs")
    fifo = root / "train" / "dog" / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=f"{fifo}: not a regular file"):
        prepare(with_workers(make_params("folder", str(root)), 2), tmp_path / "out")


@pytest.mark.parametrize("side, noted", [(32, False), (127, False), (200, True)])
def test_prepare_says_in_one_line_when_the_images_are_far_larger_than_data_image_size(tmp_path, capsys, side, noted):
    root = make_folder(tmp_path / "imgs", n_train=10, n_test=1, size=(side + 40, side))  # the shorter side counts
    prepare(with_workers(make_params("folder", str(root)), 2), tmp_path / "out")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
    if noted:
        assert notes == [f"Note: the images' median shorter side is {side} px, resized to 32x32 (data.image_size); "
                         "for more detail set data.image_size (e.g. -S data.image_size=128): memory and time per "
                         "epoch grow with its square"]
    else:
        assert notes == []
