"""Plug-ins: every module of a plug-in package registers itself under its name (a data source, a model family).

Adding one is adding a file: the registry imports every module of its package the first time it is
asked for a name, so no list elsewhere has to be kept in step.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from imgclf.errors import ImgclfError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plug-in, filled by the modules of `package` (whose `__path__` is `path`)."""

    def __init__(self, kind: str, package: str, path: list[str]):
        self.kind, self.package, self.path = kind, package, path
        self._plugins: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, plugin: T) -> T:
        """Called once by each plug-in module, at import."""
        if name in self._plugins:
            raise ImgclfError(f"two {self.kind}s are registered as {name!r}; rename one")
        self._plugins[name] = plugin
        return plugin

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in pkgutil.iter_modules(self.path):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._plugins))

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._plugins[name]
        except KeyError:
            raise ImgclfError(f"{name!r}: no such {self.kind}; choose one of {', '.join(self.names())}") from None

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._plugins.items())
