"""Plug-in registries (imgclf.plugins): a plug-in that fails to import is named in one line, every time."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from imgclf.errors import ImgclfError

PACKAGE = "imgclf_test_widgets"


@pytest.fixture
def widgets(tmp_path, monkeypatch):
    """A plug-in package `imgclf_test_widgets` with modules a, b, c; b registers then raises."""
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text(
        "from imgclf.plugins import Registry\nREGISTRY = Registry('widget', __name__, __path__)\n")
    for name in "abc":
        (package / f"{name}.py").write_text(f"from {PACKAGE} import REGISTRY\nREGISTRY.register('{name}', 1)\n")
    broken = f"from {PACKAGE} import REGISTRY\nREGISTRY.register('b', 2)\nraise RuntimeError('boom')\n"
    (package / "b.py").write_text(broken)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for module in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
        del sys.modules[module]


def test_a_broken_plug_in_is_named_every_time_and_works_once_fixed(widgets):
    registry = importlib.import_module(PACKAGE).REGISTRY
    message = (f"{widgets / 'b.py'}: the widget plug-in {PACKAGE}.b failed to import (RuntimeError: boom); "
               "fix or remove that file")
    for _ in range(2):  # the second call reports the same, never a half-filled registry
        with pytest.raises(ImgclfError, match=f"^{re.escape(message)}$"):
            registry.names()
    (widgets / "b.py").write_text(f"from {PACKAGE} import REGISTRY\nREGISTRY.register('b', 2)\n")
    importlib.invalidate_caches()
    assert registry.names() == ("a", "b", "c") and registry.get("b") == 2
