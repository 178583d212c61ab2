"""Reading data/prepared back: the arrays of every split, each checked against the manifest's sha256.

Used by train, evaluate and rerun; kept apart from prepare.py so that their DVC dependencies do not
include the data sources' code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imgclf.errors import DataError, one_line
from imgclf.files import sha256_array
from imgclf.paths import MANIFEST, PREPARED_DIR, SPLITS


def load_prepared(prepared_dir: str | Path = PREPARED_DIR) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """({"train": (x, y), "dev": (x, y)[, "test": (x, y)]}, manifest), each array checked against the manifest."""
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
            try:
                array = np.load(folder / name, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise DataError(f"{folder / name}: missing or unreadable ({one_line(exc)}); {fix}") from None
            if sha256_array(array) != manifest.get("arrays", {}).get(name):
                raise DataError(f"{folder / name}: does not match {MANIFEST} (changed since prepare); {fix}")
            pair.append(array)
        splits[split] = (pair[0], pair[1])
    if "train" not in splits or "dev" not in splits:
        raise DataError(f"{folder / MANIFEST}: lists no train/dev splits; {fix}")
    return splits, manifest
