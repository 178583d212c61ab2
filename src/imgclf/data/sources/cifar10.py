"""`data.dataset: cifar10`: the official CIFAR-10 python archive, md5-checked, read without extracting.

The batches are pickles: they go through a restricted unpickler that can only rebuild NumPy arrays,
never plain `pickle.load`. The archive is downloaded once to data/raw/ when absent (and online).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import urllib.request
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imgclf.errors import DataError, one_line
from imgclf.files.atomic import atomic_write
from imgclf.files.digests import sha256_file
from imgclf.data.images import check_labels, check_pair
from imgclf.files.paths import CIFAR10_DEFAULT_PATH
from imgclf.data.sources import REGISTRY, DataSource, Source

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MD5_ENV = "IMGCLF_CIFAR10_MD5"  # the expected md5 of a re-packed archive, instead of the official one
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"{CIFAR10_DIR}/data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = f"{CIFAR10_DIR}/test_batch"
CIFAR10_META = f"{CIFAR10_DIR}/batches.meta"
CIFAR10_CLASSES = 10
# A real batch is ~31 MB; anything far larger is not a CIFAR batch and could exhaust memory.
MAX_MEMBER_BYTES = 256 << 20


# What a numpy-array pickle legitimately needs, resolved from numpy itself so the names work on
# numpy 1 (numpy.core) and 2 (numpy._core) without importing deprecated modules.
_PICKLE_GLOBALS = {
    "_reconstruct": np.zeros(1).__reduce__()[0],
    "_frombuffer": np.zeros(1).__reduce_ex__(5)[0],  # protocol-5 array pickles
    "scalar": np.float64(0).__reduce__()[0],
    "ndarray": np.ndarray,
    "dtype": np.dtype,
}
_PICKLE_MODULES = {
    "_reconstruct": ("numpy.core.multiarray", "numpy._core.multiarray"),
    "_frombuffer": ("numpy.core.numeric", "numpy._core.numeric"),
    "scalar": ("numpy.core.multiarray", "numpy._core.multiarray"),
    "ndarray": ("numpy",),
    "dtype": ("numpy",),
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    def __init__(self, file: Any, member: str) -> None:
        """Bytes keys, as CIFAR's Python 2 pickles need; `member` names the file in errors."""
        super().__init__(file, encoding="bytes")
        self.member = member

    def find_class(self, module: str, name: str) -> Any:
        """Allow only numpy's array-rebuilding globals; anything else could run code."""
        if module in _PICKLE_MODULES.get(name, ()):
            return _PICKLE_GLOBALS[name]
        raise DataError(
            f"{self.member}: refused to load global {module}.{name} (not a plain CIFAR batch; "
            "the file may be malicious); use the official cifar-10-python.tar.gz"
        )


def _unpickle(data: bytes, member: str) -> Any:
    """Unpickle one archive member with the restricted unpickler."""
    try:
        return _SafeUnpickler(BytesIO(data), member).load()
    except DataError:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything; all mean "corrupt"
        raise DataError(f"{member}: not a readable pickle ({one_line(exc)}); re-download the archive") from None


def _download(url: str, path: Path) -> None:
    """Fetch `url` to `path` through a temp file, so a failed download leaves nothing behind."""

    def write(tmp: Path) -> None:
        """Stream the response into the temp file."""
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 20)

    print(f"{path}: not found, downloading {url}", file=sys.stderr)
    try:
        atomic_write(path, write)
    except Exception as exc:  # URLError, timeouts, HTTP errors, bad URLs: all mean "no archive"
        raise DataError(
            f"{path}: not found and could not be downloaded ({one_line(exc)}); download "
            "cifar-10-python.tar.gz by hand and put it there, or set data.path"
        ) from None


def _md5_file(path: Path) -> str:
    """Streaming md5 (the checksum CIFAR-10 publishes)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def _read_members(archive: Path, decoders: dict[str, Callable[[bytes, str], Any]]) -> dict[str, Any]:
    """Read and decode the wanted members straight from the tar, never extracting anything to disk.

    Each member is decoded as soon as it is read, so only one member's raw bytes are in memory at once.
    """
    found: dict[str, Any] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # read to the end so the gzip trailer and CRC get checked
                name = member.name.removeprefix("./")
                if name not in decoders:
                    continue
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{archive}: {name} is not a regular file of sane size; use the official archive")
                found[name] = decoders[name](tar.extractfile(member).read(), f"{archive}: {name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"{archive}: truncated or not a gzip tar archive ({one_line(exc)}); "
            "re-download it or point data.path at a good copy"
        ) from None
    missing = sorted(set(decoders) - set(found))
    if missing:
        raise DataError(f"{archive}: member {missing[0]} missing; use the official cifar-10-python.tar.gz")
    return found


def _cifar_batch(data: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode and validate one CIFAR batch: uint8 (N, 3072) rows plus N labels in 0..9."""
    batch = _unpickle(data, member)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{member}: not a CIFAR batch (needs keys b'data' and b'labels'); re-download the archive")
    rows = batch[b"data"]
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        got = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
        raise DataError(f"{member}: data must be uint8 of shape (N, 3072), got {got}; re-download the archive")
    labels = check_labels(batch[b"labels"], member, CIFAR10_CLASSES)
    check_pair(rows, labels, "data", "labels", member)
    # Rows are channel-first (R plane, G plane, B plane); models want channels last.
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_classes(data: bytes, member: str) -> list[str]:
    """The ten label names from batches.meta."""
    meta = _unpickle(data, member)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != CIFAR10_CLASSES or not all(isinstance(n, bytes) for n in names):
        raise DataError(f"{member}: needs b'label_names', a list of 10 byte strings; re-download the archive")
    return [n.decode("utf-8", "replace") for n in names]


def load_cifar10(path: str | Path | None = None, expected_md5: str | None = None) -> Source:
    """The CIFAR-10 python archive (downloaded once if absent), md5-checked, read without extracting.

    The md5 expected is `expected_md5`, else $IMGCLF_CIFAR10_MD5, else the official archive's.
    """
    expected_md5 = expected_md5 or os.environ.get(CIFAR10_MD5_ENV) or CIFAR10_MD5
    archive = Path(path or CIFAR10_DEFAULT_PATH)
    if not archive.exists():
        _download(CIFAR10_URL, archive)
    if not archive.is_file():
        raise DataError(f"{archive}: not a file; set data.path to cifar-10-python.tar.gz")
    md5 = _md5_file(archive)
    if md5 != expected_md5:
        raise DataError(
            f"{archive}: md5 {md5} != expected {expected_md5} (corrupt or not the official archive); "
            "re-download cifar-10-python.tar.gz or point data.path at a good copy"
        )
    decoders = {name: _cifar_batch for name in (*CIFAR10_TRAIN, CIFAR10_TEST)} | {CIFAR10_META: _cifar_classes}
    members = _read_members(archive, decoders)
    batches = [members.pop(name) for name in CIFAR10_TRAIN]
    test = members.pop(CIFAR10_TEST)
    y = np.concatenate([b[1] for b in batches])
    # One copy, straight into C order: concatenating the transposed views keeps their layout, and making
    # that contiguous afterwards would hold the training images twice.
    x = np.concatenate([b[0] for b in batches], out=np.empty((len(y), 32, 32, 3), np.uint8))
    info = {"path": str(path or CIFAR10_DEFAULT_PATH), "sha256": sha256_file(archive), "md5": md5}
    return Source(x, y, members[CIFAR10_META], info, (np.ascontiguousarray(test[0]), test[1]))


def load(data: dict) -> Source:
    """params["data"] -> the archive at data.path, or data/raw/'s (downloaded there once when absent)."""
    return load_cifar10(data.get("path"))


REGISTRY.register("cifar10", DataSource(load=load, fixed_size=32, default_path=CIFAR10_DEFAULT_PATH))
