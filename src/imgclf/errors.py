"""What ends a command early: user-facing errors (one line, exit 2) and SIGINT/SIGTERM (exit 130).

A signal handler runs wherever the main thread happens to be. Raising from it inside TensorFlow, MLflow
or a library's broad `except` can be swallowed or turned into another error, so while training runs
(`deferred_interrupts`) the handler only records the signal, and `raise_if_interrupted`, called from our
own code at every batch boundary, raises it. Outside training the handler raises at once, so Ctrl-C
stops `prepare` or `evaluate` immediately; a second signal always raises at once.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
from typing import Callable, Iterator


class ImgclfError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits 2."""


class DataError(ImgclfError):
    """The data source or the prepared arrays are missing, malformed or unsafe."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: raised like Ctrl-C so runs end KILLED, temp files go and the CLI exits 130."""


def one_line(exc: BaseException) -> str:
    """An exception's text squeezed onto one line (messages must stay one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


OS_FIXES = {
    errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space",
    errno.EACCES: "fix its permissions", errno.EPERM: "fix its permissions", errno.EROFS: "make it writable",
    errno.ENOENT: "check the path", errno.ENOTDIR: "check the path", errno.EISDIR: "check the path",
    errno.ELOOP: "check the path", errno.EMFILE: "raise the open-files limit (ulimit -n)",
    errno.EIO: "check the disk",
}


def reason_and_fix(exc: OSError) -> tuple[str, str]:
    """The system's reason for an OSError and what to do about it (OS_FIXES): the "reason; fix" of every
    one-line OS error."""
    return exc.strerror or one_line(exc), OS_FIXES.get(exc.errno, "fix it")


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the path(s) it names, the system's reason, and what to do."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason, fix = reason_and_fix(exc)
    return f"{paths or type(exc).__name__}: {reason}; {fix} and rerun"


def exit_code(prog: str, command: Callable[[], int]) -> int:
    """Run a command: its exit code, or one line on stderr and 2 for a user-facing or OS error, 130 when
    interrupted (every entry point's contract: never a traceback)."""
    try:
        return command()
    except ImgclfError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk, permission or path problem no stage anticipated: still one line
        print(f"{prog}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


_signals: list[int] = []   # every SIGINT/SIGTERM received by this process, in order
_deferring = [False]       # inside deferred_interrupts(): record only


def on_interrupt_signal(signum, frame) -> None:
    """The SIGINT/SIGTERM handler: record the signal; raise unless training defers it (and not twice)."""
    _signals.append(signum)
    if not _deferring[0] or len(_signals) > 1:
        raise Interrupted()


def install_handlers() -> None:
    """Route SIGINT and SIGTERM to on_interrupt_signal.

    SIGINT too: a shell starts background jobs with SIGINT ignored and Python keeps that, yet a training
    run must still end its MLflow run KILLED and keep its checkpoint when sent SIGINT.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_interrupt_signal)


def raise_if_interrupted() -> None:
    """Raise Interrupted if a signal arrived: called from our code at safe points (batch ends, stage steps)."""
    if _signals:
        raise Interrupted()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Inside: a first signal is only recorded, for raise_if_interrupted to raise at the next safe point."""
    previous, _deferring[0] = _deferring[0], True
    try:
        yield
    finally:
        _deferring[0] = previous
    raise_if_interrupted()
