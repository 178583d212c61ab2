"""The `prepare` stage: a data source -> seeded, stratified uint8 arrays plus manifest.json.

The source is the plug-in `data.dataset` names (src/imgclf/sources/); this module splits what it
loaded into train/dev (and its test split, if any) and writes data/prepared atomically. Nothing here
imports TensorFlow, so the stage stays light.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from imgclf import sources
from imgclf.errors import DataError, one_line
from imgclf.files import naming_failed_writes, new_temp_dir, recover_dir, replace_dir, sha256_bytes, write_json
from imgclf.paths import MANIFEST, PREPARED_DIR
from imgclf.sources import Source


def _stratified(idx: np.ndarray, y: np.ndarray, classes: list[str], seed: int, step: str, **size: Any) -> list:
    """Seeded stratified train_test_split of `idx`; a class too small to split -> DataError."""
    # Imported only now: sklearn adds ~190 MB of memory, which a CIFAR-sized load need not carry at its peak.
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(idx, stratify=y, random_state=seed, shuffle=True, **size)
    except ValueError as exc:
        counts = np.bincount(y, minlength=len(classes))
        present = np.flatnonzero(counts)
        rare = present[np.argmin(counts[present])]
        raise DataError(
            f"{step}: cannot stratify, class '{classes[rare]}' has {counts[rare]} of {len(y)} images "
            f"({one_line(exc)}); raise data.max_train_samples or data.dev_fraction, or add images of that class"
        ) from None


def split_source(source: Source, seed: int, dev_fraction: float, max_train_samples: int | None) -> dict:
    """{"train", "dev"[, "test"]} -> (x, y, rows): optional stratified subset, then stratified dev split.

    A split is the rows `rows` (all when None) of x and y: they are only copied out chunk by chunk
    when written, so the data set is never in memory twice.
    """
    if len(source.y) == 0:
        raise DataError(f"{source.info['path']}: no training images; add some")
    idx = np.arange(len(source.y))
    if max_train_samples is not None and max_train_samples < len(idx):
        step = f"data.max_train_samples={max_train_samples}"
        idx = _stratified(idx, source.y, source.classes, seed, step, train_size=max_train_samples)[0]
    step = f"data.dev_fraction={dev_fraction} of {len(idx)} images"
    train, dev = _stratified(idx, source.y[idx], source.classes, seed, step, test_size=dev_fraction)
    splits = {"train": (source.x, source.y, train), "dev": (source.x, source.y, dev)}
    if source.test is not None:
        splits["test"] = (*source.test, None)
    return splits


def _save_rows(path: Path, array: np.ndarray, rows: np.ndarray | None, chunk: int = 4096) -> str:
    """np.save(path, array[rows]) and return sha256_array(array[rows]), without ever holding array[rows].

    The same .npy bytes as np.save (format 1.0 header, C order) and the same digest as sha256_array.
    """
    rows = np.arange(len(array)) if rows is None else rows
    shape = (len(rows), *array.shape[1:])
    digest = hashlib.sha256(f"{array.dtype.str}{shape}".encode())
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": shape}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for start in range(0, len(rows), chunk):
            block = np.ascontiguousarray(array[rows[start:start + chunk]]).reshape(-1).view(np.uint8)
            fh.write(block)
            digest.update(block)
    return digest.hexdigest()


def _write_splits(folder: Path, splits: dict, source: Source, params: dict) -> dict:
    """Save every split's arrays into `folder` and write manifest.json describing them."""
    arrays, summary = {}, {}
    for split, (x, y, rows) in splits.items():
        for name, array in ((f"x_{split}.npy", x), (f"y_{split}.npy", y)):
            arrays[name] = _save_rows(folder / name, array, rows)
        labels = y if rows is None else y[rows]
        counts = np.bincount(labels, minlength=len(source.classes))
        summary[split] = {"count": int(len(labels)), "per_class": dict(zip(source.classes, map(int, counts)))}
    data = params["data"]
    manifest = {
        "dataset": data["dataset"],
        "source": source.info,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "image_shape": list(source.x.shape[1:]),
        "seed": params["seed"],
        "dev_fraction": data["dev_fraction"],
        "max_train_samples": data["max_train_samples"],
        "splits": summary,
        "arrays": arrays,
        "digest": sha256_bytes("".join(f"{n}:{s}\n" for n, s in sorted(arrays.items())).encode()),
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def prepare(params: dict, out_dir: str | Path = PREPARED_DIR) -> dict:
    """Load params["data"]'s source, split it with params["seed"], replace out_dir atomically; return the manifest."""
    recover_dir(out_dir)  # first: a killed earlier prepare's old output is back even if this one fails
    data = params["data"]
    return write_prepared(sources.REGISTRY.get(data["dataset"]).load(data), params, out_dir)


def _return_freed_memory() -> None:
    """Hand the memory the load has freed back to the OS before the split allocates more (glibc only).

    glibc keeps freed blocks below 32 MB (each raw CIFAR batch is ~31 MB) for reuse, so without this
    the split's sklearn import and copies would add ~150 MB to a CIFAR prepare's peak. Elsewhere: no-op.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def write_prepared(source: Source, params: dict, out_dir: str | Path = PREPARED_DIR) -> dict:
    """Split a loaded source with params["seed"] and replace out_dir atomically; return the manifest."""
    _return_freed_memory()
    data = params["data"]
    splits = split_source(source, params["seed"], data["dev_fraction"], data["max_train_samples"])
    tmp = new_temp_dir(out_dir)
    try:
        with naming_failed_writes(out_dir):  # a full disk names data/prepared, not the temp folder
            manifest = _write_splits(tmp, splits, source, params)
            replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace_dir
    return manifest


def summarize(manifest: dict, out_dir: str | Path) -> str:
    """One paragraph describing a prepared data set."""
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    classes = manifest["classes"]
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return (
        f"Prepared {manifest['dataset']}: {counts} images of {len(classes)} classes ({shown}), "
        f"{'x'.join(map(str, manifest['image_shape']))} uint8, seed {manifest['seed']}; written to {out_dir} "
        f"(digest {manifest['digest'][:12]})."
    )


def main(params: dict, out_dir: str = PREPARED_DIR) -> dict:
    """The prepare stage's entry point (`imgclf prepare`): prepare from validated params, print a summary."""
    manifest = prepare(params, out_dir)
    print(summarize(manifest, out_dir))
    return manifest

