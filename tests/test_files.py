"""File helpers (imgclf.files.atomic): atomic writes that leave nothing half-written, JSON, digests."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from imgclf.errors import ImgclfError, Interrupted
from imgclf.files.atomic import atomic_write, read_json, write_json
from imgclf.files.digests import sha256_array
from imgclf.files.folders import new_temp_dir, recover_dir, replace_dir


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


def test_atomic_write_fsyncs_the_file_before_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "out.json"
    seen = []
    atomic_write(path, lambda tmp: (seen.append(str(tmp)), tmp.write_text("{}")))
    assert events == [("fsync", seen[0]), ("replace", seen[0], str(path)), ("fsync", str(tmp_path))]


def test_replace_dir_puts_the_old_folder_back_when_interrupted_between_its_renames(tmp_path, monkeypatch):
    dest = tmp_path / "prepared"
    for content in ("old", "new"):
        (tmp_path / content).mkdir()
        (tmp_path / content / "f").write_text(content)
    replace_dir(tmp_path / "old", dest)
    real_replace = os.replace

    def signal_after_the_first_rename(src, dst):
        real_replace(src, dst)
        monkeypatch.setattr(os, "replace", real_replace)
        raise Interrupted()  # SIGTERM's handler raising right after the old folder moved aside

    monkeypatch.setattr(os, "replace", signal_after_the_first_rename)
    with pytest.raises(Interrupted):
        replace_dir(tmp_path / "new", dest)
    assert (dest / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "prepared"]


def test_a_folder_stranded_by_a_killed_process_is_restored_or_removed(tmp_path):
    dest = tmp_path / "prepared"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no process holds any more
    old = tmp_path / f".prepared.old-{dead.pid}.tmp"
    live = f".prepared.{os.getppid()}-a1b2.tmp"
    for folder in (old, tmp_path / f".prepared.{dead.pid}-x1y2.tmp", tmp_path / live):
        folder.mkdir()
        (folder / "f").write_text(folder.name)
    recover_dir(dest)  # dest missing: the old copy comes back; the dead writer's temp goes; a live one's stays
    assert (dest / "f").read_text() == old.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [live, "prepared"]
    old.mkdir()
    recover_dir(dest)  # dest present: a stranded old copy is only garbage
    assert (dest / "f").read_text() == old.name and not old.exists()
