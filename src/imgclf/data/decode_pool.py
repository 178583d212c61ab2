"""Worker processes for `prepare`: tasks run on every core, results come back in order, none left behind.

`Workers(n).ordered(func, tasks)` yields func(*task) for each task, in task order. Each worker holds at most
DEPTH tasks (task i runs on worker i % n): one it works on, one queued, so it never idles waiting for the
parent, yet at most DEPTH * n tasks are out at once, whatever their number (Pool.imap would feed every task at
once). Tasks are small messages, so the parent never blocks sending to a busy worker. n == 1 runs
the tasks in this process. The processes start at the first `ordered` call: a source that decodes nothing
(digits, cifar10, npz) starts none.

Each worker talks to the parent over its own pipe, with no thread in between: a worker that dies, even
half-way through a reply, shows up as the end of its pipe (never a wait for the rest of a message), and
`close()` can always terminate and join them all, whatever ended the work: a task's exception (raised here,
as itself: a bad image is still one line), Ctrl-C or SIGTERM (raised here as Interrupted by imgclf.errors).
Workers ignore SIGINT, which a terminal sends to the whole process group: the parent alone decides. A
SIGKILLed parent cannot clean up, so each worker asks the kernel to kill it along with its parent.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from imgclf.errors import ImgclfError, one_line

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEPTH = 2  # tasks a worker holds: the one it runs and the next
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0))


def _start_method() -> str:
    # fork is the cheapest start, but a child forked while other threads run (TensorFlow's, in tests or a
    # notebook) can inherit a lock some thread held and hang. Then spawn: a fresh interpreter per worker,
    # which, unlike forkserver, leaves no server process and no temp folder behind in this process.
    return "fork" if "tensorflow" not in sys.modules and threading.active_count() == 1 else "spawn"


def _init_worker(parent: int) -> None:
    """In each worker, first: leave signals to the parent, and die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a fork inherits the CLI's handler, which would raise here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # held since the fork (Workers._start), exec or not
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: close() is the only clean-up
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _serve(conn, parent: int) -> None:
    """A worker's life: run each (func, args) received, send back (True, result) or (False, exception)."""
    _init_worker(parent)
    while True:
        try:
            func, args = conn.recv()
        except EOFError:  # the parent closed its end
            return
        try:
            reply = (True, func(*args))
        except Exception as exc:
            reply = (False, exc)
        try:
            conn.send(reply)
        except Exception:  # an exception that does not pickle: its text still reaches the parent
            conn.send((False, RuntimeError(f"{type(reply[1]).__name__}: {one_line(reply[1])}")))


class Workers:
    """n worker processes (None: every usable core) running picklable module-level functions."""

    def __init__(self, n: int | None = None):
        self.n = usable_cores() if n is None else n
        self._workers: list[tuple[Any, Any]] = []  # (process, the parent's end of its pipe)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def ordered(self, func: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        """func(*task) for each task, in order; a task's exception is raised here, at its turn."""
        if self.n == 1:
            yield from (func(*task) for task in tasks)
            return
        tasks, busy = iter(tasks), deque()  # the workers holding a task, in task order

        def give(worker: int) -> None:
            task = next(tasks, None)
            if task is not None:
                self._start()
                try:
                    self._workers[worker][1].send((func, task))
                except OSError:  # it died while idle
                    raise self._died(worker) from None
                busy.append(worker)

        try:
            for worker in [*range(self.n)] * DEPTH:
                give(worker)
            while busy:
                worker = busy.popleft()
                result = self._receive(worker)
                give(worker)  # before the result is used: the worker decodes while the parent writes
                yield result
        finally:
            if busy:  # abandoned part-way (an error, a signal): replies still due would answer the next call
                self.close()

    def _start(self) -> None:
        if self._workers:
            return
        context, parent = multiprocessing.get_context(_start_method()), os.getpid()
        # held until each worker's _init_worker: else a Ctrl-C right after a fork runs the CLI's handler there
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for _ in range(self.n):
                mine, theirs = context.Pipe()
                process = context.Process(target=_serve, args=(theirs, parent), daemon=True)
                self._workers.append((process, mine))
                process.start()
                theirs.close()  # only the worker holds its end now: its death closes the pipe
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _receive(self, worker: int) -> Any:
        try:
            ok, value = self._workers[worker][1].recv()
        except (EOFError, OSError):  # its end closed, maybe half-way through a reply: it died
            raise self._died(worker) from None
        if not ok:
            raise value
        return value

    def _died(self, worker: int) -> ImgclfError:
        """One line for a worker that died under us (the kernel's OOM killer, most likely): never a hang."""
        process = self._workers[worker][0]
        process.join(5)
        code = process.exitcode
        how = f"killed by signal {-code}: {signal.strsignal(-code)}" if code and code < 0 else f"exit code {code}"
        return ImgclfError(f"a prepare worker process died ({how}); out of memory? lower data.workers or free "
                           "memory, and rerun")

    def close(self) -> None:
        """Terminate and join every worker: nothing outlives the stage, whatever ended it."""
        workers, self._workers = self._workers, []
        try:
            for process, _ in workers:
                if process.pid is not None:  # started
                    process.terminate()
        finally:
            for process, conn in workers:
                conn.close()
                if process.pid is not None:
                    process.join()
