"""Reading data/prepared back (imgclf.files.prepared_reader): every array checked against the manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fakes import make_params
from imgclf.files import prepared_reader as prepared
from imgclf.errors import DataError
from imgclf.prepare import prepare
from imgclf.files.prepared_reader import load_prepared


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


def test_splits_are_read_only_memory_maps_checked_by_reading_the_whole_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(make_params(max_train_samples=100, dev_fraction=0.2), out)
    monkeypatch.setattr(prepared, "READ_BYTES", 1000)  # the digest streams through many reads
    splits, _ = load_prepared(out)
    for split, (x, y) in splits.items():
        assert isinstance(x, np.memmap) and isinstance(y, np.memmap) and not x.flags.writeable
        np.testing.assert_array_equal(x, np.load(out / f"x_{split}.npy"))
    with open(out / "x_dev.npy", "ab") as fh:  # bytes past the array's end are part of the file, so checked
        fh.write(b"\0")
    with pytest.raises(DataError, match="x_dev.npy: does not match"):
        load_prepared(out)


def test_checking_a_split_does_not_bring_it_into_memory(tmp_path):
    out = tmp_path / "out"
    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, (4000, 64, 64, 3))  # 47 MiB of pixels
    x[:] = np.random.default_rng(0).integers(0, 256, x.shape[1:], dtype=np.uint8)
    x.flush()
    np.savez(tmp_path / "big.npz", x_train=x, y_train=np.arange(4000) % 2)
    del x
    prepare(make_params("npz", str(tmp_path / "big.npz"), image_size=64), out)
    # VmHWM, not ru_maxrss: a fresh process inherits the pytest process's ru_maxrss across exec
    code = ("import json, re; from pathlib import Path; from imgclf.files.prepared_reader import load_prepared; "
            "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1]); "
            f"before = peak(); load_prepared({str(out)!r}); "
            "print(json.dumps([before, peak()]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = json.loads(proc.stdout)
    assert (after - before) * 1024 < 8 << 20, (before, after)  # KiB: under 8 MiB for 47 MiB checked
