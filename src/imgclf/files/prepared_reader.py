"""Reading data/prepared back: every split's arrays memory-mapped, each checked against the manifest's sha256.

Used by train, evaluate and rerun; kept apart from prepare.py so that their DVC dependencies do not
include the data sources' code. The arrays stay on disk: train gathers each batch from the map and
evaluate predicts chunk by chunk, so a data set larger than memory trains in bounded memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imgclf.errors import DataError, one_line
from imgclf.files.digests import array_hasher
from imgclf.files.paths import MANIFEST, PREPARED_DIR, SPLITS

READ_BYTES = 1 << 20  # the digest check reads the file through this buffer, never through the map


def _open_npy(path: Path, fix: str) -> np.ndarray:
    """The .npy at `path`, memory-mapped read-only."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: missing or unreadable ({one_line(exc)}); {fix}") from None


def npy_digest(path: Path, array: np.memmap) -> str:
    """files.sha256_array(array) for the .npy `array` was loaded from, streamed from the file in READ_BYTES
    reads: hashing through the map would leave the whole data set resident in this process."""
    digest = array_hasher(array.dtype, array.shape)
    with open(path, "rb") as fh:
        fh.seek(array.offset)  # past the .npy header
        while block := fh.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def load_prepared(prepared_dir: str | Path = PREPARED_DIR) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """({"train": (x, y), "dev": (x, y)[, "test": (x, y)]}, manifest): read-only memory maps, each checked
    against the manifest."""
    folder = Path(prepared_dir)
    fix = "run `dvc repro prepare` (or `imgclf prepare`)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / MANIFEST}: missing or unreadable ({one_line(exc)}); {fix}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{folder / MANIFEST}: not a prepare manifest; {fix}")
    splits = {}
    for split in (s for s in SPLITS if s in manifest.get("splits", {})):
        pair = []
        for name in (f"x_{split}.npy", f"y_{split}.npy"):
            array = _open_npy(folder / name, fix)
            if npy_digest(folder / name, array) != manifest.get("arrays", {}).get(name):
                raise DataError(f"{folder / name}: does not match {MANIFEST} (changed since prepare); {fix}")
            pair.append(array)
        splits[split] = (pair[0], pair[1])
    if "train" not in splits or "dev" not in splits:
        raise DataError(f"{folder / MANIFEST}: lists no train/dev splits; {fix}")
    return splits, manifest
