"""sha256 digests of bytes, files and arrays: equal digests mean equal contents (dtype and shape included)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Streaming sha256 of a file (archives can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def array_hasher(dtype: np.dtype, shape: tuple):
    """The sha256 of sha256_array with dtype and shape fed in: update it with the C-ordered bytes. Writers
    and readers that stream an array's bytes (prepare, prepared) start here, so their digests stay equal."""
    return hashlib.sha256(f"{np.dtype(dtype).str}{tuple(shape)}".encode())


def sha256_array(array: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-ordered bytes, so equal digests mean equal arrays."""
    array = np.ascontiguousarray(array)
    digest = array_hasher(array.dtype, array.shape)
    digest.update(array.reshape(-1).view(np.uint8))  # the bytes in place: tobytes() would copy the array
    return digest.hexdigest()
