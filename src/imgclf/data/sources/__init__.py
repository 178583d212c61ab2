"""Data sources of the prepare stage, one module each, registered under the name `data.dataset` takes.

A source module builds a `DataSource` and registers it:

    REGISTRY.register("mine", DataSource(load=load_mine, fixed_size=None))

`load(params["data"])` returns a `Source`: the training pool, an optional test split, class names and
provenance; every bad input raises DataError with one line naming the culprit and the fix. Splitting,
writing and the manifest are the prepare stage's job (prepare.py), the same for every source.

A source's images are an ndarray, or, for a data set that need not fit in memory, an `Images`: the array's
shape and dtype, and `decode_into(path, offset, rows, workers)`, which writes those rows' images into the
file prepare allocated, a few rows at a time, decoded on prepare's worker processes (imgclf.data.decode_pool), and
yields how many rows are written, in order. The pixels go from each worker straight to the file: prepare
only reads them back to hash them. Only the labels are needed to split, so nothing is decoded before
prepare writes it. Such a source may also give `finish(workers)`: called once
every split is written, it returns the complete `info` (the folder source's digest of every file, most
of them read while decoding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from imgclf.errors import DataError
from imgclf.plugins import Registry
from imgclf.data.decode_pool import Workers


class Images(Protocol):
    """Images read lazily: what prepare needs of the (N, S, S, 3) uint8 array they stand for."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __len__(self) -> int: ...

    def decode_into(self, path: Path, offset: int, rows: np.ndarray, workers: Workers) -> Iterator[int]:
        """Write the images of `rows`, C-ordered, into the file `path` from byte `offset` on; after each chunk,
        in order, yield how many rows (from the first) are written."""
        ...


@dataclass
class Source:
    """One loaded data set: the training pool, the optional test split, class names, provenance."""

    x: np.ndarray | Images
    y: np.ndarray
    classes: list[str]
    info: dict[str, Any]
    test: tuple[np.ndarray | Images, np.ndarray] | None = field(default=None)
    finish: Callable[[Workers], dict[str, Any]] | None = None  # -> the complete info, once the splits are written


@dataclass(frozen=True)
class DataSource:
    """A registered source: its loader, the one image size it has (None: any, data.image_size), and where it
    reads from when data.path is null (None: nowhere on disk, e.g. bundled with a package)."""

    load: Callable[[dict], Source]
    fixed_size: int | None = None
    default_path: str | None = None

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
