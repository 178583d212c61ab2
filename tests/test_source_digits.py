"""The digits source: sklearn's bundled digits as 32x32 RGB, prepared end to end."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fakes import make_params
from imgclf.prepare import prepare
from imgclf.files.prepared_reader import load_prepared


def test_digits_prepare(tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare(make_params(), out)
    splits, loaded = load_prepared(out)
    assert loaded == manifest
    assert set(splits) == {"train", "dev"} and "test" not in manifest["splits"]
    assert not (out / "x_test.npy").exists()
    x_train, y_train = splits["train"]
    assert x_train.dtype == np.uint8 and x_train.shape[1:] == (32, 32, 3) and y_train.dtype == np.int64
    assert len(y_train) + len(splits["dev"][1]) == 1797
    assert manifest["classes"] == [str(i) for i in range(10)]
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(x_train)) <= allowed and x_train.min() == 0 and x_train.max() == 255
    # nearest-neighbour upscaling and gray -> RGB replication
    assert np.array_equal(x_train[:, ::4, ::4], x_train[:, 3::4, 3::4])
    assert np.array_equal(x_train[..., 0], x_train[..., 2])
    assert manifest["source"]["path"] is None and len(manifest["source"]["sha256"]) == 64
    assert manifest["image_shape"] == [32, 32, 3] and manifest["seed"] == 51
    assert set(manifest["arrays"]) == {"x_train.npy", "y_train.npy", "x_dev.npy", "y_dev.npy"}
    lines = "".join(f"{k}:{v}\n" for k, v in sorted(manifest["arrays"].items()))
    assert manifest["digest"] == hashlib.sha256(lines.encode()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
