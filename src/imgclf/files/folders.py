"""Replacing a whole output folder (data/prepared) so readers see the old one or the new one, never a mix, and
putting back what a killed writer left beside it."""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

from imgclf.errors import deferred_interrupts
from imgclf.files.atomic import _umask
from imgclf.process import pid_alive


def new_temp_dir(dest: str | Path) -> Path:
    """A fresh empty folder beside `dest`, to be filled then moved into place by `replace_dir`.

    Its name holds the writer's pid, so `recover_dir` can tell a killed writer's leftovers from a live one's.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    return tmp


def _aside(dest: Path) -> Path:
    """Where replace_dir moves the old `dest` meanwhile: git ignores `.*.tmp*`, like the temp folder."""
    return dest.with_name(f".{dest.name}.old-{os.getpid()}.tmp")


def replace_dir(tmp: Path, dest: str | Path) -> Path:
    """Move the finished folder `tmp` to `dest`, replacing what was there.

    Two renames: the old folder is moved aside first, then the new one into place. An error or a
    signal between them puts the old folder back, so `dest` is always the whole old folder or the
    whole new one; only `kill -9` there leaves it missing, for `recover_dir` to put back on the next start.
    """
    dest, old = Path(dest), _aside(Path(dest))
    with deferred_interrupts():  # a first signal waits until dest is whole again (a second one does not)
        try:
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
        finally:
            if old.exists() and not dest.exists():
                os.replace(old, dest)
            shutil.rmtree(old, ignore_errors=True)  # not reached if putting it back failed
    return dest


def _alive(pid: int) -> bool:
    """Whether another process has this pid (ours is reused from a gone one: containers restart pids)."""
    return pid != os.getpid() and pid_alive(pid)


def recover_dir(dest: str | Path) -> None:
    """Clean up what killed replace_dir / new_temp_dir callers left beside `dest`.

    A missing `dest` gets its old copy back when exactly one was stranded (with several, which is newest
    cannot be told: all are kept); partial temp folders go, and old copies once `dest` exists. Leftovers
    of a process still alive are never touched: it may be writing them now.
    """
    dest = Path(dest)
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(?:(old)-(\d+)|(\d+)-\w+)\.tmp")
    matches = (pattern.fullmatch(p.name) for p in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"))
    stale = [(dest.with_name(m[0]), bool(m[1])) for m in matches if m and not _alive(int(m[2] or m[3]))]
    olds = [path for path, is_old in stale if is_old]
    if not dest.exists() and len(olds) == 1:
        os.replace(olds[0], dest)
    for path, is_old in stale:
        if dest.exists() or not is_old:
            shutil.rmtree(path, ignore_errors=True)
