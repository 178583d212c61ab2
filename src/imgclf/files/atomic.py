"""Writing an output whole or not at all: atomic writes, JSON, and one line naming the output when a write fails
(a full disk, permissions), HDF5's included."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from imgclf.errors import ImgclfError, reason_and_fix


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
        with naming_failed_writes(path):
            write(tmp_path)
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            _fsync(tmp_path)  # else a power cut after the rename can leave the new name on empty or partial data
            os.replace(tmp_path, path)
            _fsync(path.parent)  # the rename itself lives in the folder: make it durable too
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


class WriteError(ImgclfError, OSError):
    """An output could not be written (disk full, read-only, permissions): names the output, not a temp file.
    Still an OSError, for callers that handle the write's own error."""


# Writers report a full disk in their own ways: h5py and Keras' zip writer wrap the OSError in their errors.
_FULL_DISK = re.compile(r"No space left on device|Disk quota exceeded|errno\s*=?\s*28\b", re.IGNORECASE)


def _free_space(folder: Path) -> str:
    """What is free where `folder` lives, as `12.3 MiB free on /mount`, or '' when unknown."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(len(units) - 1, max(0, (free.bit_length() - 1) // 10))
    return f"{free / 1024 ** power:.1f} {units[power]} free"


def write_failure(path: Path, exc: BaseException) -> WriteError | None:
    """One line for a failed write of output `path` (the output, not its temp file), or None if not an I/O error."""
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or bool(_FULL_DISK.search(str(exc)))
    if isinstance(exc, OSError) and not full:
        reason, fix = reason_and_fix(exc)
    elif full:
        reason, fix = "No space left on device", "free disk space"
    else:
        return None
    free = _free_space(path.parent if path.parent.exists() else Path("."))
    return WriteError(f"{path}: could not be written ({reason}{'; ' + free if free else ''}); {fix} and rerun "
                      "(the previous output, if any, is unchanged)")


@contextlib.contextmanager
def naming_failed_writes(path: str | Path) -> Iterator[None]:
    """Turn an I/O failure while writing output `path` (or its temp file) into a WriteError naming `path`.

    HDF5 (Keras' .weights.h5) reports a failed write over and over: h5py's finalizers print it as tracebacks,
    straight to stderr or through sys.unraisablehook, and the library's clean-up at exit crashes (SIGSEGV:
    exit -11, not 2). So the write's stderr is held back and dropped after such a failure, the hook stays
    silenced, and hdf5_broken tells the CLI to leave without that clean-up once its one line is out.
    """
    held, previous_hook = io.StringIO(), sys.unraisablehook
    sys.unraisablehook = _quiet_hdf5_failures
    try:
        with contextlib.redirect_stderr(held):
            yield
    except Exception as exc:  # writers wrap OSError in their own types (h5py, zipfile, matplotlib)
        # an inner write (a file inside a temp folder) failed: name the output the user knows instead
        original = exc.__cause__ if isinstance(exc, WriteError) and exc.__cause__ else exc
        error = None if isinstance(original, ImgclfError) else write_failure(Path(path), original)
        hdf5_broken[0] = hdf5_broken[0] or bool(error and _HDF5_FAILED.search(str(original)))
        if error is None:
            raise
        raise error from original
    finally:
        if not hdf5_broken[0]:
            sys.unraisablehook = previous_hook
            sys.stderr.write(held.getvalue())


_HDF5_FAILED = re.compile(r"file write failed")  # HDF5's words for an I/O error
hdf5_broken = [False]  # an HDF5 write failed in this process: see naming_failed_writes


def _quiet_hdf5_failures(unraisable) -> None:
    """sys.unraisablehook while writing: h5py's finalizers repeat a failed write we report in one line anyway."""
    if not _HDF5_FAILED.search(str(unraisable.exc_value)):
        sys.__unraisablehook__(unraisable)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP) or not path.is_dir():
            raise  # some file systems cannot sync a folder, and say so; any other failure is real
    finally:
        os.close(fd)


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
