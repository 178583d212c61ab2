"""File helpers (imgclf.files): atomic writes that leave nothing half-written, JSON, digests."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write, new_temp_dir, read_json, replace_dir, sha256_array, write_json


def test_atomic_write_keeps_the_suffix_and_leaves_no_temp_file(tmp_path):
    seen = []
    atomic_write(tmp_path / "sub" / "x.weights.h5", lambda tmp: (seen.append(tmp.name), tmp.write_text("ok")))
    assert seen[0].startswith(".x.") and seen[0].endswith(".tmp.weights.h5")
    assert (tmp_path / "sub" / "x.weights.h5").read_text() == "ok"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.weights.h5"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert read_json(path, "thing") == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_json_is_sorted_and_read_errors_name_the_stage(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ImgclfError, match="missing.json: not found; run the stage that writes the summary"):
        read_json(tmp_path / "missing.json", "summary")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ImgclfError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json", "summary")


def test_replace_dir_swaps_whole_folders(tmp_path):
    dest = tmp_path / "prepared"
    for content in ("old", "new"):
        tmp = new_temp_dir(dest)
        (tmp / "f").write_text(content)
        replace_dir(tmp, dest)
    assert (dest / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_sha256_array_sees_dtype_shape_and_bytes():
    a = np.arange(6, dtype=np.uint8)
    assert sha256_array(a) == sha256_array(a.copy())
    assert len({sha256_array(a), sha256_array(a.reshape(2, 3)), sha256_array(a.astype(np.int64))}) == 3
    assert sha256_array(np.arange(12)[::2]) == sha256_array(np.arange(12)[::2].copy())  # views hash like copies
