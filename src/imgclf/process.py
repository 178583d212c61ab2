"""Processes: a command's own start and end, kept cheap for the garbage collector; whether another process is
alive (one check for every module that asks); the last line a child process wrote.

Importing Keras (with TensorFlow, scikit-learn and matplotlib) and MLflow makes ~600,000 objects that live
as long as the process. Python's collector walks all of them again at each full collection while they
pile up, and at exit. Measured per `imgclf train` / `evaluate` here: 1.4-1.9 CPU seconds of collections
while importing, and 1.8-2.3 more at exit, of 11-12 in all (benchmarks/collector.py).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Iterator

# What TensorFlow's C++ side prints while its libraries load, before TF_CPP_MIN_LOG_LEVEL applies (absl is not
# initialised yet): start-up chatter, twice per command, that buries a command's own lines.
STARTUP_CHATTER = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
                             r"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
                             r"This TensorFlow binary is optimized|TF-TRT Warning")


def imports_first(*modules: str) -> ModuleType:
    """Import `modules` with the garbage collector off, then freeze what exists into its permanent generation,
    which later collections skip, and put the collector back as it was: the first module. Called where a
    command first imports Keras or MLflow.

    Frozen objects are still freed by reference counting when nothing holds them; only a cycle among them
    would never be collected, and imports leave few. The command's own garbage after this is collected as
    usual. When every module is imported already, nothing is frozen.
    """
    if all(name in sys.modules for name in modules):  # nothing to import: no freeze of whatever exists now
        return sys.modules[modules[0]]
    was_on = gc.isenabled()
    gc.disable()
    try:
        with startup_chatter_dropped():
            loaded = [importlib.import_module(name) for name in modules]
    finally:
        gc.freeze()
        if was_on:  # a caller who had turned it off keeps it off
            gc.enable()
    return loaded[0]


@contextlib.contextmanager
def startup_chatter_dropped() -> Iterator[None]:
    """Run the block with file descriptor 2 captured, then write back every line but TensorFlow's start-up
    chatter (STARTUP_CHATTER): all of them when the block raised, whose error may be explained there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if failed or not STARTUP_CHATTER.search(line)))
            sys.stderr.flush()


def leave(code: int) -> int:
    """A console script's exit code, returned after freezing every object out of the collector: Python's
    exit then skips its full collections. Atexit handlers (MLflow's, logging's) still run and everything not
    in a cycle is still freed; the OS takes back the rest with the process. Console scripts only: in a
    long-lived process (a test calling main()) frozen cycles would never be collected.
    """
    gc.freeze()
    return code


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine is alive. A zombie nobody reaped counts as dead; another user's
    process, and a pid that names no single process (0 or less), count as alive: a live writer is never taken
    for a dead one."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): trust kill(0)
        return True


def last_line(text: str) -> str:
    """The last non-empty line of a child process's output or log, stripped ('' when there is none), for
    one-line errors."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then they arrive as usual): a clean-up that a Ctrl-C
    must not cut in half (a worktree being removed, a run being ended)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
