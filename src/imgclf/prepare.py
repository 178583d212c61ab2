"""The `prepare` stage: a data source -> seeded, stratified uint8 arrays plus manifest.json.

The source is the plug-in `data.dataset` names (src/imgclf/data/sources/); this module splits what it
loaded into train/dev (and its test split, if any) and writes data/prepared atomically. Each array is
written into its preallocated .npy a chunk of rows at a time; a lazy source's images (the folder's) are
decoded on `data.workers` processes, each writing its chunks into the file, so neither the data set nor a
split is ever in memory. Nothing here imports TensorFlow, so the stage stays light (and worker processes can fork).
"""

from __future__ import annotations

import ctypes
import errno
import io
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data import sources
from imgclf.errors import DataError, one_line
from imgclf.files.atomic import naming_failed_writes, write_json
from imgclf.files.digests import array_hasher, sha256_bytes
from imgclf.files.folders import new_temp_dir, recover_dir, replace_dir
from imgclf.files.paths import MANIFEST, PREPARED_DIR
from imgclf.data.sources import Images, Source
from imgclf.data.decode_pool import Workers


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

    A split is the rows `rows` (all when None) of x and y: they are only copied out (or decoded) chunk
    by chunk when written, so the data set is never in memory twice (a lazy source's: not even once).
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


def _layout(array: np.ndarray | Images, rows: np.ndarray | None) -> tuple[np.ndarray, tuple, bytes]:
    """The rows to write (all when None), their shape, and the .npy header np.save writes for them."""
    rows = np.arange(len(array)) if rows is None else rows
    shape = (len(rows), *array.shape[1:])
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(array.dtype)
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return rows, shape, header.getvalue()


def _reserve(path: Path, array: np.ndarray | Images, rows: np.ndarray | None) -> None:
    """Allocate the whole .npy of array[rows] now, so a full disk fails before the decoding, not hours in."""
    _, shape, header = _layout(array, rows)
    allocate = getattr(os, "posix_fallocate", None)  # Linux and most Unixes; not macOS
    with open(path, "wb") as fh:
        try:
            if allocate:
                allocate(fh.fileno(), 0, len(header) + math.prod(shape) * array.dtype.itemsize)
        except OSError as exc:  # these three: the file system cannot; the file then grows as it is written
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


def _save_rows(path: Path, array: np.ndarray | Images, rows: np.ndarray | None, chunk: int = 4096,
               workers: Workers | None = None) -> str:
    """np.save(path, array[rows]) and return sha256_array(array[rows]), without ever holding array[rows].

    The same .npy bytes as np.save (format 1.0 header, C order) and the same digest as sha256_array,
    written over the file in place (as _reserve allocated it). An Images is decoded into the file on
    `workers` (default: in this process); its rows are hashed as they land, in order.
    """
    rows, shape, header = _layout(array, rows)
    digest = array_hasher(array.dtype, shape)
    with open(path, "r+b" if path.exists() else "wb") as fh:
        fh.write(header)
        if isinstance(array, np.ndarray):
            for start in range(0, len(rows), chunk):
                block = np.ascontiguousarray(array[rows[start:start + chunk]]).reshape(-1).view(np.uint8)
                fh.write(block)
                digest.update(block)
        else:
            fh.flush()
            row_bytes, done = math.prod(shape[1:]) * array.dtype.itemsize, 0
            for written in array.decode_into(path, len(header), rows, workers or Workers(1)):
                digest.update(os.pread(fh.fileno(), (written - done) * row_bytes, len(header) + done * row_bytes))
                done = written
            fh.seek(len(header) + done * row_bytes)
        fh.truncate()  # the file may have held more
    return digest.hexdigest()


def _write_splits(folder: Path, splits: dict, source: Source, params: dict, workers: Workers) -> dict:
    """Save every split's arrays into `folder` and write manifest.json describing them."""
    outputs = {f"{kind}_{split}.npy": (array, rows)
               for split, (x, y, rows) in splits.items() for kind, array in (("x", x), ("y", y))}
    for name, (array, rows) in outputs.items():  # every file first: a full disk fails before any decoding
        _reserve(folder / name, array, rows)
    arrays = {name: _save_rows(folder / name, *output, workers=workers) for name, output in outputs.items()}
    summary = {}
    for split, (_, y, rows) in splits.items():
        labels = y if rows is None else y[rows]
        counts = np.bincount(labels, minlength=len(source.classes))
        summary[split] = {"count": int(len(labels)), "per_class": dict(zip(source.classes, map(int, counts)))}
    data = params["data"]
    manifest = {
        "dataset": data["dataset"],
        "source": source.finish(workers) if source.finish else source.info,
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
            # data.workers is absent from params built in code (tests, benchmarks): every core then
            with Workers(data.get("workers")) as workers:  # all gone before the output is replaced
                manifest = _write_splits(tmp, splits, source, params, workers)
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

