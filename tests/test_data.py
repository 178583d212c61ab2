"""Tests for the prepare stage (imgclf.data): every source, the split rules, and bad inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from fakes import CIFAR_NAMES, EvalEvil, Evil, cifar_batch, dumps, make_folder, make_npz, md5, save_image, snapshot
from fakes import write_cifar
from imgclf import data
from imgclf.data import DataError, load_prepared, prepare
from imgclf.io import sha256_array

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def make_params(dataset="digits", path=None, dev_fraction=0.1, max_train_samples=None, seed=51):
    """The two sections prepare() reads."""
    return {
        "seed": seed,
        "data": {
            "dataset": dataset,
            "path": path,
            "dev_fraction": dev_fraction,
            "max_train_samples": max_train_samples,
        },
    }


@pytest.fixture
def cifar(tmp_path):
    return write_cifar(tmp_path / "cifar-10-python.tar.gz")


def load_fake(path: Path):
    return data.load_cifar10(path, expected_md5=md5(path))


# --- digits -------------------------------------------------------------------------------------


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
    source = data.load_digits_source()
    rows = np.random.default_rng(0).permutation(len(source.y))[:1000]
    for array in (source.x, source.y):
        digest = data._save_rows(tmp_path / "chunked.npy", array, rows, chunk)
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
    manifest = data.main(params, str(tmp_path / "out"))
    text = capsys.readouterr().out
    assert "digits" in text and "train 80" in text and "dev 20" in text and str(tmp_path / "out") in text
    assert manifest["splits"]["train"]["count"] == 80


# --- load_prepared ------------------------------------------------------------------------------


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


# --- cifar10 ------------------------------------------------------------------------------------


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
    with pytest.raises(DataError, match=f"{cifar}: md5 .* != expected {data.CIFAR10_MD5}"):
        prepare(make_params("cifar10", str(cifar), dev_fraction=0.2), tmp_path / "out")
    monkeypatch.setattr(data.load_cifar10, "__defaults__", (None, md5(cifar)))
    manifest = prepare(make_params("cifar10", str(cifar), dev_fraction=0.2), tmp_path / "out")
    splits, _ = load_prepared(tmp_path / "out")
    assert [manifest["splits"][s]["count"] for s in ("train", "dev", "test")] == [80, 20, 20]
    assert manifest["splits"]["test"]["per_class"]["truck"] == 2
    assert manifest["source"]["md5"] == md5(cifar) and manifest["classes"] == CIFAR_NAMES
    assert splits["test"][0].shape == (20, 32, 32, 3)


def test_cifar_download(cifar, tmp_path, monkeypatch):
    target = tmp_path / "raw" / "cifar.tar.gz"
    monkeypatch.setattr(data, "CIFAR10_URL", (tmp_path / "absent.tar.gz").as_uri())
    with pytest.raises(DataError, match=f"{target}: not found and could not be downloaded .*set data.path"):
        data.load_cifar10(target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    monkeypatch.setattr(data, "CIFAR10_URL", cifar.as_uri())
    assert len(data.load_cifar10(target, expected_md5=md5(cifar)).y) == 100
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
    monkeypatch.setenv(data.CIFAR10_MD5_ENV, md5(archive))  # the env var the CLI reads, instead of expected_md5
    assert prepare(make_params("cifar10", str(archive)), work / "out")["splits"]["test"]["count"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.tar.gz", "work"]
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    link = write_cifar(tmp_path / "link.tar.gz", extra={"cifar-10-batches-py/data_batch_1": Path("/etc/passwd")})
    with pytest.raises(DataError, match="data_batch_1 is not a regular file of sane size"):
        load_fake(link)


# --- folder -------------------------------------------------------------------------------------


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
    source = data.load_folder(root)
    red = source.x[[i for i, y in enumerate(source.y) if y == 2][-1]]  # red.BMP sorts after 0009.png
    assert np.all(red == [255, 0, 0])
    assert splits["train"][0].shape[1:] == (32, 32, 3) and splits["test"][1].dtype == np.int64
    assert manifest["source"]["sha256"] == data.load_folder(root).info["sha256"]


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
        data.load_folder(root)


def test_folder_non_image(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "dog" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=f"{root / 'train' / 'dog' / 'notes.txt'}: not an image.*remove it"):
        data.load_folder(root)


@pytest.mark.parametrize("name", ["0003.png", "0004.jpg"])
def test_folder_truncated_image(tmp_path, name):
    root = make_folder(tmp_path / "imgs")
    bad = root / "train" / "frog" / name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{bad}: unreadable or truncated image"):
        data.load_folder(root)


def test_folder_test_classes_must_match(tmp_path):
    root = make_folder(tmp_path / "imgs", n_test=1)
    save_image(root / "test" / "owl" / "0.png")
    with pytest.raises(DataError, match="test: class folders differ from train/ \\(owl\\)"):
        data.load_folder(root)


# --- npz ----------------------------------------------------------------------------------------


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
    source = data.load_npz(npz)
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
        data.load_npz(make_npz(tmp_path / "bad.npz", **extra))


def test_npz_missing_or_not_zip(tmp_path):
    with pytest.raises(DataError, match="data.path is null; set data.path to a .npz file"):
        prepare(make_params("npz", None), tmp_path / "out")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=f"{junk}: not a readable .npz"):
        data.load_npz(junk)
    npz = make_npz(tmp_path / "d.npz")
    npz.write_bytes(npz.read_bytes()[:500])
    with pytest.raises(DataError, match=f"{npz}: not a readable .npz"):
        data.load_npz(npz)


# --- failure leaves earlier output alone --------------------------------------------------------


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

    monkeypatch.setattr(data, "write_json", broken_write_json)  # fails after the temp dir is filled
    with pytest.raises(OSError, match="disk full"):
        prepare(make_params(), out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "c.tar.gz", "prepared"]
