"""The cifar10 source: the official archive's layout, md5, download, and every bad member."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fakes import CIFAR_NAMES, EvalEvil, Evil, cifar_batch, dumps, make_params, md5, write_cifar
from imgclf.errors import DataError
from imgclf.prepare import prepare
from imgclf.files.prepared_reader import load_prepared
from imgclf.data.sources import cifar10


@pytest.fixture
def cifar(tmp_path):
    return write_cifar(tmp_path / "cifar-10-python.tar.gz")


def load_fake(path: Path):
    return cifar10.load_cifar10(path, expected_md5=md5(path))


def test_py2_pickler_writes_no_codecs_global():
    assert b"_codecs" not in dumps(cifar_batch(), "py2") and b"_codecs" in dumps(cifar_batch(), 2)


@pytest.mark.parametrize("protocol", ["py2", 4, 5])
def test_cifar_loads_channels_last(tmp_path, protocol):
    cifar = write_cifar(tmp_path / "cifar-10-python.tar.gz", protocol)
    source = load_fake(cifar)
    assert source.classes == CIFAR_NAMES
    assert source.x.shape == (100, 32, 32, 3) and source.x.dtype == np.uint8 and source.y.dtype == np.int64
    assert source.test[0].shape == (20, 32, 32, 3) and len(source.test[1]) == 20
    rows = cifar_batch(seed=1)[b"data"]
    assert source.x[0, 5, 7, 2] == rows[0, 2 * 1024 + 5 * 32 + 7]
    assert source.info["md5"] == md5(cifar) and source.info["sha256"] == hashlib.sha256(cifar.read_bytes()).hexdigest()


def test_cifar_prepare(cifar, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=f"{cifar}: md5 .* != expected {cifar10.CIFAR10_MD5}"):
        prepare(make_params("cifar10", str(cifar), dev_fraction=0.2), tmp_path / "out")
    monkeypatch.setattr(cifar10.load_cifar10, "__defaults__", (None, md5(cifar)))
    manifest = prepare(make_params("cifar10", str(cifar), dev_fraction=0.2), tmp_path / "out")
    splits, _ = load_prepared(tmp_path / "out")
    assert [manifest["splits"][s]["count"] for s in ("train", "dev", "test")] == [80, 20, 20]
    assert manifest["splits"]["test"]["per_class"]["truck"] == 2
    assert manifest["source"]["md5"] == md5(cifar) and manifest["classes"] == CIFAR_NAMES
    assert splits["test"][0].shape == (20, 32, 32, 3)


def test_cifar_download(cifar, tmp_path, monkeypatch):
    target = tmp_path / "raw" / "cifar.tar.gz"
    monkeypatch.setattr(cifar10, "CIFAR10_URL", (tmp_path / "absent.tar.gz").as_uri())
    with pytest.raises(DataError, match=f"{target}: not found and could not be downloaded .*set data.path"):
        cifar10.load_cifar10(target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    monkeypatch.setattr(cifar10, "CIFAR10_URL", cifar.as_uri())
    assert len(cifar10.load_cifar10(target, expected_md5=md5(cifar)).y) == 100
    assert target.read_bytes() == cifar.read_bytes()


def test_cifar_truncated_and_not_gzip(cifar, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(cifar.read_bytes()[: cifar.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{cut}: truncated or not a gzip tar archive"):
        load_fake(cut)
    plain = tmp_path / "plain.tar.gz"
    plain.write_bytes(b"this is not gzip data at all" * 10)
    with pytest.raises(DataError, match=f"{plain}: truncated or not a gzip tar archive"):
        load_fake(plain)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"data_batch_3": None}, "member cifar-10-batches-py/data_batch_3 missing"),
        ({"data_batch_2": {**cifar_batch(), b"data": np.zeros((20, 1024), np.uint8)}}, "data_batch_2: data must be"),
        ({"test_batch": cifar_batch(labels=[10] * 20)}, "test_batch: label 10 out of range"),
        ({"data_batch_1": cifar_batch(labels=[1] * 19)}, "data_batch_1: data has 20 images but labels has 19"),
        ({"data_batch_4": {b"labels": [1]}}, "data_batch_4: not a CIFAR batch"),
        ({"data_batch_5": b"\x80\x02garbage"}, "data_batch_5: not a readable pickle"),
        ({"batches.meta": {b"label_names": [b"a"]}}, "batches.meta: needs b'label_names'"),
    ],
)
def test_cifar_bad_members(tmp_path, overrides, pattern):
    with pytest.raises(DataError, match=pattern):
        load_fake(write_cifar(tmp_path / "bad.tar.gz", **overrides))


@pytest.mark.parametrize("payload", [Evil, EvalEvil])
def test_cifar_malicious_pickle_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if payload is Evil else f"open({str(marker)!r}, 'w')"
    archive = write_cifar(tmp_path / "evil.tar.gz", data_batch_1={b"data": payload(command), b"labels": [0]})
    with pytest.raises(DataError, match=r"data_batch_1: refused to load global \w+\.(system|eval)"):
        load_fake(archive)
    assert not marker.exists()


def test_cifar_members_are_never_extracted_anywhere(tmp_path, monkeypatch):
    """`..` and absolute member names write nothing (members are only read); a symlink member is refused."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    escapes = {"../escaped": b"x", f"{tmp_path}/absolute": b"x", "cifar-10-batches-py/../../escaped-too": b"x"}
    archive = write_cifar(tmp_path / "names.tar.gz", extra=escapes)
    monkeypatch.setenv(cifar10.CIFAR10_MD5_ENV, md5(archive))  # the env var the CLI reads, instead of expected_md5
    assert prepare(make_params("cifar10", str(archive)), work / "out")["splits"]["test"]["count"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.tar.gz", "work"]
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    link = write_cifar(tmp_path / "link.tar.gz", extra={"cifar-10-batches-py/data_batch_1": Path("/etc/passwd")})
    with pytest.raises(DataError, match="data_batch_1 is not a regular file of sane size"):
        load_fake(link)
