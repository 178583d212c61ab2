"""The prepare stage (imgclf.prepare): seeded stratified splits, chunked writes, atomic replacement."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import yaml

from conftest import REPO
from fakes import make_npz, make_params, snapshot, write_cifar
from imgclf import prepare as prepare_stage
from imgclf.errors import DataError
from imgclf.files import sha256_array
from imgclf.prepare import prepare
from imgclf.sources.digits import load_digits_source

REPO_PARAMS = REPO / "params.yaml"


def test_split_is_stratified_deterministic_and_seeded(tmp_path):
    first = prepare(make_params(seed=1), tmp_path / "a")
    again = prepare(make_params(seed=1), tmp_path / "b")
    other = prepare(make_params(seed=2), tmp_path / "c")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert first["digest"] == again["digest"] != other["digest"]
    assert not np.array_equal(np.load(tmp_path / "a" / "y_dev.npy"), np.load(tmp_path / "c" / "y_dev.npy"))
    totals = np.bincount(np.concatenate([np.load(tmp_path / "a" / f"y_{s}.npy") for s in ("train", "dev")]))
    dev = np.array(list(first["splits"]["dev"]["per_class"].values()))
    assert np.all(np.abs(dev - totals * 0.1) <= 1)


@pytest.mark.parametrize("chunk", [1, 300, 4096])
def test_split_rows_are_written_chunk_by_chunk_exactly_like_np_save(tmp_path, chunk):
    source = load_digits_source()
    rows = np.random.default_rng(0).permutation(len(source.y))[:1000]
    for array in (source.x, source.y):
        digest = prepare_stage._save_rows(tmp_path / "chunked.npy", array, rows, chunk)
        np.save(tmp_path / "whole.npy", array[rows])
        assert (tmp_path / "chunked.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
        assert digest == sha256_array(array[rows])


def test_max_train_samples(tmp_path):
    manifest = prepare(make_params(max_train_samples=200, dev_fraction=0.2), tmp_path / "out")
    assert manifest["splits"]["train"]["count"] == 160 and manifest["splits"]["dev"]["count"] == 40
    for split, expected in (("train", 16), ("dev", 4)):
        assert all(abs(n - expected) <= 1 for n in manifest["splits"][split]["per_class"].values())
    assert manifest["max_train_samples"] == 200


def test_impossible_stratification_names_class(tmp_path):
    with pytest.raises(DataError, match="class '.'.*max_train_samples"):
        prepare(make_params(max_train_samples=20, dev_fraction=0.1), tmp_path / "out")
    npz = make_npz(tmp_path / "d.npz", n=9, test=False, y_train=np.array([0, 0, 0, 0, 1, 1, 1, 1, 2]))
    with pytest.raises(DataError, match="class '2' has 1 of 9"):
        prepare(make_params("npz", str(npz)), tmp_path / "out")


def test_main_prints_summary(tmp_path, capsys):
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["data"] |= {"dataset": "digits", "max_train_samples": 100, "dev_fraction": 0.2}
    manifest = prepare_stage.main(params, str(tmp_path / "out"))
    text = capsys.readouterr().out
    assert "digits" in text and "train 80" in text and "dev 20" in text and str(tmp_path / "out") in text
    assert manifest["splits"]["train"]["count"] == 80


def test_failed_prepare_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare(make_params(max_train_samples=100, dev_fraction=0.2), out)
    before = snapshot(out)
    bad = make_npz(tmp_path / "bad.npz", y_train=np.arange(39) % 4)
    with pytest.raises(DataError):
        prepare(make_params("npz", str(bad)), out)
    with pytest.raises(DataError):
        prepare(make_params("cifar10", str(write_cifar(tmp_path / "c.tar.gz"))), out)

    def broken_write_json(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_stage, "write_json", broken_write_json)  # fails after the temp dir is filled
    with pytest.raises(OSError, match="disk full"):
        prepare(make_params(), out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "c.tar.gz", "prepared"]


def test_output_stranded_by_a_kill_between_the_renames_is_back_even_when_the_next_prepare_fails(tmp_path):
    out = tmp_path / "prepared"
    prepare(make_params(max_train_samples=100, dev_fraction=0.2), out)
    before = snapshot(out)
    dead = subprocess.Popen(["true"])
    dead.wait()  # the pid of the killed prepare: no process holds it now
    out.rename(tmp_path / f".prepared.old-{dead.pid}.tmp")  # where kill -9 between the renames leaves it
    bad = make_npz(tmp_path / "bad.npz", y_train=np.arange(39) % 4)
    with pytest.raises(DataError):
        prepare(make_params("npz", str(bad)), out)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "prepared"]
