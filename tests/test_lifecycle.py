"""imgclf.process: a command's heavy imports run with the garbage collector off and end up frozen out of
its later collections; the console scripts' exit is tested in test_cli."""

from __future__ import annotations

import gc
import sys

import pytest

from imgclf.process import imports_first

# A module that records whether the collector ran while it was imported, and keeps a cycle of its own.
MODULE = """
import gc
COLLECTOR_ON = gc.isenabled()
CYCLE = []
CYCLE.append(CYCLE)
"""


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """Write modules into a folder on sys.path; forget them afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, text: str) -> str:
        (tmp_path / f"{name}.py").write_text(text)
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    yield write
    for name in [path.stem for path in tmp_path.glob("*.py")]:
        sys.modules.pop(name, None)


def test_imports_run_without_the_collector_then_are_frozen_and_it_is_back_on(on_path):
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the harness undoes a freeze after each test
    first = imports_first(on_path("lifecycle_a", MODULE), on_path("lifecycle_b", MODULE))
    assert first is sys.modules["lifecycle_a"] and "lifecycle_b" in sys.modules
    assert first.COLLECTOR_ON is False and sys.modules["lifecycle_b"].COLLECTOR_ON is False
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    assert not any(obj is first.CYCLE for obj in gc.get_objects())  # frozen: no generation holds it now


def test_a_failed_import_still_turns_the_collector_back_on(on_path):
    with pytest.raises(ZeroDivisionError):
        imports_first(on_path("lifecycle_ok", MODULE), on_path("lifecycle_bad", "1 / 0"))
    assert gc.isenabled()


def test_modules_imported_already_freeze_nothing():
    assert imports_first("json", "gc").__name__ == "json"
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off(on_path):
    gc.disable()
    try:
        imports_first(on_path("lifecycle_c", MODULE))
        assert not gc.isenabled()
    finally:
        gc.enable()
