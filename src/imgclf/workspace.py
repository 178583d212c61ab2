"""One writer per workspace: the stages and `imgclf experiments` hold a lock on the working directory.

Two `imgclf train` in one folder (or one by hand during `dvc repro`) would write the same checkpoint
folder, model and reports at once. The second refuses at once with one line naming the holder; nobody
waits, because a training can hold the workspace for hours. The lock is an flock, which the kernel
drops when its process dies, so a lock left by `kill -9` is free by construction: the next run only
notes it. Outside DVC, a running `dvc repro` (DVC's own lock, also an flock, held between and around
its stages) counts as a holder too. Checked by cli.py before any stage imports anything heavy, together
with whether the stage's output folders are writable, so nothing is trained that cannot be saved.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

from imgclf.errors import ImgclfError, reason_and_fix
from imgclf.process import pid_alive
from imgclf.training.distribute import chief_by_tf_config
from imgclf.files.paths import CHECKPOINT_DIR, FINGERPRINT_JSON, MODEL_PATH, PREPARED_DIR, REPORTS_DIR

LOCK_FILE = ".imgclf.lock.tmp"   # in the working directory; git ignores `.*.tmp*`
DVC_LOCK = ".dvc/tmp/lock"       # DVC's repository lock (zc.lockfile: an flock, the holder's pid inside)
# The folders each command writes into (a missing one is created by the stage: its parent is checked).
OUTPUT_DIRS = {
    "fingerprint": (str(Path(FINGERPRINT_JSON).parent),),
    "prepare": (str(Path(PREPARED_DIR).parent),),
    "train": (str(Path(MODEL_PATH).parent), CHECKPOINT_DIR, REPORTS_DIR),
    "evaluate": (REPORTS_DIR,),
    "experiments": (REPORTS_DIR,),
}


class WorkspaceBusy(ImgclfError):
    """Another process writes this workspace now."""


def _holder(text: str) -> str:
    """'imgclf train (pid 123, since 12:00:01)' from the lock file's line, or a vaguer name while it is written."""
    pid, _, rest = text.strip().partition(" ")
    command, _, since = rest.partition(" @ ")
    return f"{command or 'another imgclf command'} (pid {pid or 'unknown'}{', since ' + since if since else ''})"


def _non_chief_worker(command: str) -> bool:
    """A multi-worker training process other than the chief: it writes nothing, so it needs no lock."""
    return command == "train" and not chief_by_tf_config()


def _refuse_if_dvc_runs(root: Path) -> None:
    """Outside DVC, refuse while a DVC command holds the repository lock (e.g. `dvc repro` between stages)."""
    path = root / DVC_LOCK
    if os.environ.get("DVC_ROOT") or not path.is_file():
        return  # run by DVC itself (it has released its lock for our command), or no DVC here
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = fh.read().strip() or "unknown"
            raise WorkspaceBusy(f"{root}: in use by a DVC command (pid {pid}, e.g. dvc repro); wait for it to "
                                "finish, or stop it, then rerun") from None
        fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def workspace_lock(command: str, root: Path | None = None) -> Iterator[None]:
    """Hold the workspace (`root`, default the working directory) for `imgclf <command>`, or refuse at once."""
    root = Path.cwd() if root is None else root
    with open(os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666), "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(f"{root}: in use by {_holder(fh.read())}; wait for it to finish, or stop it, "
                                "then rerun") from None
        previous = fh.read().strip()
        if previous[:1].isdigit() and not pid_alive(int(previous.split()[0])):
            print(f"Cleared the lock {root / LOCK_FILE} left by {_holder(previous)}, which is gone (killed?)")
        _refuse_if_dvc_runs(root)
        _record(fh, f"{os.getpid()} imgclf {command} @ {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        try:
            yield
        finally:
            _record(fh, "")  # empty: nobody holds it (the kernel drops the flock when the file closes)


def _record(fh, text: str) -> None:
    fh.seek(0)
    fh.truncate()
    fh.write(text)
    fh.flush()


def check_writable(folders: tuple[str, ...], root: Path) -> None:
    """Refuse before any work when an output folder (or, if missing, the folder it would be made in) is not
    writable: a read-only reports/ must not surface only after hours of training."""
    for name in folders:
        folder = root / name
        while not folder.exists() and folder != root:
            folder = folder.parent
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            reason, fix = reason_and_fix(exc)
            raise ImgclfError(f"{folder}: not writable ({reason}); {fix} "
                              f"(e.g. chmod u+w {folder}) and rerun; nothing was changed") from None


@contextlib.contextmanager
def writer(command: str) -> Iterator[None]:
    """What every writing command runs inside: the workspace lock, then the writability of its outputs."""
    if _non_chief_worker(command):
        yield
        return
    root = Path.cwd()
    with workspace_lock(command, root):
        check_writable(OUTPUT_DIRS.get(command, ()), root)
        yield
