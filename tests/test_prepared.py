"""Reading data/prepared back (imgclf.prepared): every array checked against the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from fakes import make_params
from imgclf.errors import DataError
from imgclf.prepare import prepare
from imgclf.prepared import load_prepared


def test_load_prepared_errors(tmp_path):
    with pytest.raises(DataError, match="dvc repro prepare"):
        load_prepared(tmp_path / "nothing")
    out = tmp_path / "out"
    prepare(make_params(max_train_samples=100, dev_fraction=0.2), out)
    np.save(out / "y_dev.npy", np.zeros(20, np.int64))
    with pytest.raises(DataError, match="y_dev.npy.*dvc repro prepare"):
        load_prepared(out)
    (out / "x_train.npy").unlink()
    with pytest.raises(DataError, match="x_train.npy"):
        load_prepared(out)
