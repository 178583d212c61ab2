"""A command process's start and end, kept cheap for the garbage collector.

Importing Keras (with TensorFlow, scikit-learn and matplotlib) and MLflow makes ~600,000 objects that live
as long as the process. Python's collector walks all of them again at each full collection while they
pile up, and at exit. Measured per `imgclf train` / `evaluate` here: 1.4-1.9 CPU seconds of collections
while importing, and 1.8-2.3 more at exit, of 11-12 in all (benchmarks/collector.py).
"""

from __future__ import annotations

import gc
import importlib
import sys
from types import ModuleType


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
        loaded = [importlib.import_module(name) for name in modules]
    finally:
        gc.freeze()
        if was_on:  # a caller who had turned it off keeps it off
            gc.enable()
    return loaded[0]


def leave(code: int) -> int:
    """A console script's exit code, returned after freezing every object out of the collector: Python's
    exit then skips its full collections. Atexit handlers (MLflow's, logging's) still run and everything not
    in a cycle is still freed; the OS takes back the rest with the process. Console scripts only: in a
    long-lived process (a test calling main()) frozen cycles would never be collected.
    """
    gc.freeze()
    return code
