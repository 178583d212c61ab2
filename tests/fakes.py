"""Fake data sources for the tests: CIFAR archives, image folders, .npz files, malicious pickles."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- params --------------------------------------------------------------------------------------


def make_params(dataset="digits", path=None, dev_fraction=0.1, max_train_samples=None, seed=51, image_size=32):
    """The two sections prepare() reads."""
    return {
        "seed": seed,
        "data": {
            "dataset": dataset,
            "path": path,
            "dev_fraction": dev_fraction,
            "max_train_samples": max_train_samples,
            "image_size": image_size,
        },
    }


# --- fake CIFAR archive ---------------------------------------------------------------------


def cifar_batch(n=20, seed=0, labels=None):
    """A CIFAR-format batch dict: uint8 (n, 3072) rows, all 10 classes."""
    rng = np.random.default_rng(seed)
    labels = list(range(10)) * (n // 10) if labels is None else labels
    return {b"batch_label": b"fake", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": labels}


class Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 `str` opcodes, like the official CIFAR batches (written by Python 2)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def dumps(obj, protocol):
    """Pickle like Python 2 ("py2", protocol 2) or with a Python 3 protocol."""
    if protocol != "py2":
        return pickle.dumps(obj, protocol=protocol)
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_members(protocol="py2", **overrides):
    """Member name -> pickled bytes for a tiny archive; an override of None drops that member."""
    members = {f"cifar-10-batches-py/data_batch_{i}": cifar_batch(seed=i) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = cifar_batch(seed=9)
    members["cifar-10-batches-py/batches.meta"] = {b"label_names": [n.encode() for n in CIFAR_NAMES]}
    for short, value in overrides.items():
        members[f"cifar-10-batches-py/{short}"] = value
    return {k: v if isinstance(v, bytes) else dumps(v, protocol) for k, v in members.items() if v is not None}


def write_cifar(path: Path, protocol="py2", extra: dict[str, bytes | Path] | None = None, **overrides) -> Path:
    """Write a .tar.gz in the official layout and return its path. `extra` adds members by raw name:
    bytes become files, a Path a symlink to it (after the official members, so it replaces one of the same name)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in {**cifar_members(protocol, **overrides), **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            if isinstance(payload, Path):
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- fake folder and npz ----------------------------------------------------------------------


def save_image(path: Path, mode="RGB", size=(32, 32), color=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.as_posix()))
    if color is None:
        channels = {"RGB": 3, "RGBA": 4}.get(mode)
        shape = size[::-1] + ((channels,) if channels else ())
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode if mode != "P" else "L")
        img = img.convert(mode)
    else:
        img = Image.new(mode, size, color)
    img.save(path, format=fmt)
    return path


def make_folder(root: Path, classes=("cat", "dog", "frog"), n_train=10, n_test=0, size=(32, 32)) -> Path:
    for name in classes:
        for i in range(n_train):
            save_image(root / "train" / name / f"{i:04d}.{'png' if i % 2 else 'jpg'}", size=size)
        for i in range(n_test):
            save_image(root / "test" / name / f"{i:04d}.png", size=size)
    return root


def make_npz(path: Path, n=40, test=True, **extra) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "y_train": np.arange(n) % 4}
    if test:
        arrays |= {"x_test": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), "y_test": np.arange(8) % 4}
    arrays |= extra
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


# --- malicious pickles ---------------------------------------------------------------------


class Evil:
    """A pickle payload that runs a shell command when loaded by plain pickle.load."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalEvil(Evil):
    """The same through eval: shell-free code execution."""

    def __reduce__(self):
        return (eval, (self.command,))


# --- models --------------------------------------------------------------------------------------


def damage_weights(path) -> None:
    """Change a few bytes of one weight array inside a saved .keras, leaving a file that still loads: the zip is
    rewritten with correct CRCs and the HDF5 structure is untouched, as a bit flip on disk or a bad copy would."""
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    weights = path.with_name("weights.h5")
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as h5:
        arrays = []
        h5.visititems(lambda name, obj: arrays.append(obj) if isinstance(obj, h5py.Dataset) and obj.size else None)
        flat = arrays[0][()].reshape(-1)
        flat[:2] += 1.0
        arrays[0][...] = flat.reshape(arrays[0].shape)
    members["model.weights.h5"] = weights.read_bytes()
    weights.unlink()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
