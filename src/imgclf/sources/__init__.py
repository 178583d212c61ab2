"""Data sources of the prepare stage, one module each, registered under the name `data.dataset` takes.

A source module builds a `DataSource` and registers it:

    REGISTRY.register("mine", DataSource(load=load_mine, fixed_size=None))

`load(params["data"])` returns a `Source`: the training pool, an optional test split, class names and
provenance; every bad input raises DataError with one line naming the culprit and the fix. Splitting,
writing and the manifest are the prepare stage's job (prepare.py), the same for every source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imgclf.errors import DataError
from imgclf.registry import Registry


@dataclass
class Source:
    """One loaded data set: the training pool, the optional test split, class names, provenance."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    info: dict[str, Any]
    test: tuple[np.ndarray, np.ndarray] | None = field(default=None)


@dataclass(frozen=True)
class DataSource:
    """A registered source: its loader, and the one image size it has (None: any, data.image_size)."""

    load: Callable[[dict], Source]
    fixed_size: int | None = None

    def check(self, data: dict) -> list[str]:
        """Problems with params["data"] for this source (config's cross-check)."""
        if self.fixed_size is not None and data["image_size"] != self.fixed_size:
            return [f"data.image_size={data['image_size']}: the {data['dataset']} source has "
                    f"{self.fixed_size}x{self.fixed_size} images only; set data.image_size: {self.fixed_size}"]
        return []


REGISTRY: Registry[DataSource] = Registry("data source", __name__, __path__)


def existing_path(data: dict, want: str, is_dir: bool) -> Path:
    """data.path, which must be set, present and a folder (is_dir) or a file."""
    path = data.get("path")
    if path is None or not Path(path).exists():
        where = "data.path is null" if path is None else f"{path}: not found"
        raise DataError(f"{where}; set data.path to {want} (dataset: {data['dataset']})")
    if Path(path).is_dir() != is_dir:
        raise DataError(f"{path}: not {want}; set data.path to {want} (dataset: {data['dataset']})")
    try:  # else an unlistable folder reads as one without train/ in it: a misleading "not found"
        os.listdir(path) if is_dir else open(path, "rb").close()
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror}); fix its permissions (chmod -R u+rX {path}) "
                        "and rerun") from None
    return Path(path)
