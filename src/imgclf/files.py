"""File helpers shared by every stage: atomic writes, JSON, digests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imgclf.errors import ImgclfError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp over `path`, so readers never see a partial file.

    The temp file lives in the destination folder (same filesystem, so the rename is atomic)
    and keeps the destination's suffixes because some writers (Keras, matplotlib) pick the
    format from them (`x.weights.h5` -> `.x.1a2b.tmp.weights.h5`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, *suffixes = path.name.split(".")
    suffix = "".join(f".{s}" for s in suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as pretty, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path, what: str) -> Any:
    """Read JSON written by an earlier stage; a missing or broken file names the stage to run."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ImgclfError(f"{path}: not found; run the stage that writes the {what} first (dvc repro)") from None
    except json.JSONDecodeError as exc:
        raise ImgclfError(f"{path}: not valid JSON ({exc}); rerun the stage that writes the {what}") from None


def new_temp_dir(dest: str | Path) -> Path:
    """A fresh empty folder beside `dest`, to be filled then moved into place by `replace_dir`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    return tmp


def replace_dir(tmp: Path, dest: str | Path) -> Path:
    """Move the finished folder `tmp` to `dest`, replacing what was there.

    Two renames: the old folder is moved aside first, so at any instant `dest` is either
    the complete old folder, absent, or the complete new one. The aside name matches the
    `.*.tmp*` pattern git ignores, like the temp folder's, in case a kill lands in between.
    """
    dest = Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}.tmp")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Streaming sha256 of a file (archives can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-ordered bytes, so equal digests mean equal arrays."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # the bytes in place: tobytes() would copy the array
    return digest.hexdigest()
