"""Plug-ins (not MLflow's model registry): every module of a plug-in package registers itself under its name (a data source, a model family).

Adding one is adding a file: the registry imports every module of its package the first time it is
asked for a name, so no list elsewhere has to be kept in step.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Generic, TypeVar

from imgclf.errors import ImgclfError, one_line

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
        """Import every plug-in module once; until all have imported, every call retries and fails alike."""
        if not self._loaded:
            for module in pkgutil.iter_modules(self.path):
                self._import(module)
            self._loaded = True

    def _import(self, module: pkgutil.ModuleInfo) -> None:
        """Import one plug-in module; if it fails, forget what it registered, so that a retry (Python
        runs a module that failed again) neither half-fills the registry nor finds a duplicate name."""
        registered = dict(self._plugins)
        try:
            importlib.import_module(f"{self.package}.{module.name}")
        except BaseException as exc:
            self._plugins = registered
            if not isinstance(exc, Exception):
                raise  # Ctrl-C stays Ctrl-C
            path = Path(module.module_finder.path, module.name if module.ispkg else f"{module.name}.py")
            raise ImgclfError(f"{path}: the {self.kind} plug-in {self.package}.{module.name} failed to import "
                              f"({type(exc).__name__}: {one_line(exc)}); fix or remove that file") from exc

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
