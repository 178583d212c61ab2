"""`data.dataset: npz`: a .npz with x_train, y_train and optional x_test, y_test, class_names (no pickles)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from imgclf.errors import DataError, one_line
from imgclf.files.digests import sha256_file
from imgclf.data.images import DEFAULT_SIZE, check_labels, check_pair, to_uint8_rgb
from imgclf.data.sources import REGISTRY, DataSource, Source, existing_path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The known arrays of a .npz, loaded without pickle; unreadable files or arrays -> DataError."""
    hint = "save it with np.savez(path, x_train=..., y_train=...)"
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz ({one_line(exc)}); {hint}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, not a .npz archive; {hint}")
    with npz:
        for key in ("x_train", "y_train"):
            if key not in npz.files:
                raise DataError(f"{path}: array {key} missing; {hint}")
        arrays = {}
        for key in ("x_train", "y_train", "x_test", "y_test", "class_names"):
            try:
                if key in npz.files:
                    arrays[key] = npz[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                msg = f"{path}: {key} unreadable ({one_line(exc)}); store plain numeric/str arrays"
                raise DataError(msg) from None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: has only one of x_test / y_test; save both or neither")
    return arrays


def _npz_classes(names: np.ndarray | None, labels: list[np.ndarray], path: Path) -> list[str]:
    """Class names from `class_names`, else "0".."max label" across all splits."""
    if names is None:
        return [str(i) for i in range(max(int(y.max(initial=-1)) for y in labels) + 1)]
    if names.dtype.kind == "S":
        names = np.char.decode(names, "utf-8", "replace")
    classes = [str(n) for n in names.ravel()] if names.dtype.kind == "U" else []
    if names.ndim != 1 or not classes or len(set(classes)) != len(classes):
        raise DataError(f"{path}: class_names must be a 1-D array of distinct strings; fix it or drop it")
    return classes


def load_npz(path: str | Path, size: int = DEFAULT_SIZE) -> Source:
    """A .npz with x_train, y_train and optional x_test, y_test, class_names."""
    arrays = _read_npz(Path(path))
    splits = [s for s in ("train", "test") if f"x_{s}" in arrays]
    ys = {s: check_labels(arrays[f"y_{s}"], f"{path}: y_{s}") for s in splits}
    classes = _npz_classes(arrays.get("class_names"), list(ys.values()), Path(path))
    pairs = {}
    for s in splits:
        x = to_uint8_rgb(arrays[f"x_{s}"], f"{path}: x_{s}", size)
        check_pair(x, ys[s], f"x_{s}", f"y_{s}", str(path))
        pairs[s] = (x, check_labels(ys[s], f"{path}: y_{s}", len(classes)))
    info = {"path": str(path), "sha256": sha256_file(path)}
    return Source(*pairs["train"], classes, info, pairs.get("test"))


def load(data: dict) -> Source:
    """params["data"] -> the .npz at data.path; its images must be data.image_size square."""
    return load_npz(existing_path(data, "a .npz file", is_dir=False), data["image_size"])


REGISTRY.register("npz", DataSource(load=load))
