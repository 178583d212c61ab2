"""The npz source: arrays without pickles, class names, bad arrays refused."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fakes import make_npz, make_params
from imgclf.errors import DataError
from imgclf.prepare import prepare
from imgclf.files.prepared_reader import load_prepared
from imgclf.data.sources.npz import load_npz


def test_npz_prepare_with_class_names(tmp_path):
    names = np.array(["a", "b", "c", "d", "e"])
    npz = make_npz(tmp_path / "d.npz", class_names=names)
    manifest = prepare(make_params("npz", str(npz), dev_fraction=0.25), tmp_path / "out")
    splits, _ = load_prepared(tmp_path / "out")
    assert manifest["classes"] == list(names) and manifest["splits"]["train"]["per_class"]["e"] == 0
    assert manifest["splits"]["test"]["count"] == 8 and splits["test"][0].dtype == np.uint8
    assert manifest["source"]["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()


@pytest.mark.parametrize("shape", [(40, 32, 32), (40, 32, 32, 1)])
def test_npz_grayscale_float_and_column_labels(tmp_path, shape):
    x = np.random.default_rng(1).integers(0, 256, shape).astype(np.float32)
    npz = make_npz(tmp_path / "g.npz", test=False, x_train=x, y_train=(np.arange(40) % 4)[:, None])
    source = load_npz(npz)
    assert source.x.shape == (40, 32, 32, 3) and source.classes == ["0", "1", "2", "3"] and source.test is None
    assert np.array_equal(source.x[..., 1], x.reshape(40, 32, 32).astype(np.uint8))


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"y_train": np.arange(39) % 4}, "x_train has 40 images but y_train has 39 labels"),
        ({"y_test": -(np.arange(8) % 4)}, "y_test: negative label"),
        ({"y_train": np.arange(40) % 4, "class_names": np.array(["a", "b"])}, "y_train: label 3 out of range"),
        ({"x_train": np.full((40, 32, 32, 3), 0.5)}, "x_train: pixels must be integers in 0..255"),
        ({"x_train": np.full((40, 32, 32, 3), 300)}, "x_train: pixels must be integers in 0..255"),
        ({"x_train": np.zeros((40, 28, 28, 3), np.uint8)}, "x_train: images have shape"),
        ({"y_test": None}, "only one of x_test / y_test"),
    ],
)
def test_npz_bad_arrays(tmp_path, extra, pattern):
    with pytest.raises(DataError, match=pattern):
        load_npz(make_npz(tmp_path / "bad.npz", **extra))


def test_npz_missing_or_not_zip(tmp_path):
    with pytest.raises(DataError, match="data.path is null; set data.path to a .npz file"):
        prepare(make_params("npz", None), tmp_path / "out")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=f"{junk}: not a readable .npz"):
        load_npz(junk)
    npz = make_npz(tmp_path / "d.npz")
    npz.write_bytes(npz.read_bytes()[:500])
    with pytest.raises(DataError, match=f"{npz}: not a readable .npz"):
        load_npz(npz)
