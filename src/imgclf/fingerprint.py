"""The `fingerprint` stage: what the data source holds now, as a small file that `prepare` depends on.

DVC hashes only the paths dvc.yaml names, and data.path is a param that may point anywhere (or be null for
the bundled digits), so dvc.yaml cannot name it. DVC runs this stage on every `dvc repro` (always_changed):
it reads the source and writes data/fingerprint.json, the file count, the bytes and one sha256 over every
file's relative path, size and content. An unchanged source gives the same bytes, so DVC skips `prepare` and
everything after it; an added, removed or changed image changes the file and `prepare` reruns. A touched but
identical image changes nothing here: content is hashed, mtimes are never read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from imgclf.data import sources
from imgclf.errors import DataError
from imgclf.files.atomic import write_json
from imgclf.files.paths import FINGERPRINT_JSON
from imgclf.files.walk import relative_name, walk_files

READ_BYTES = 1 << 20


def source_path(data: dict) -> Path | None:
    """Where the source reads from: data.path, else the source's default location, else None (bundled)."""
    path = data.get("path") or sources.REGISTRY.get(data["dataset"]).default_path
    return None if path is None else Path(path)


def source_files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every file of a folder source, sorted, walked as the folder source walks it
    (files/walk.py: dotfiles left out, symlinks followed, each real folder once); a file source is its one file."""
    if not path.is_dir():
        return [(path.name, path)]
    return [(relative_name(file, path), file) for file in walk_files(path)]


def _hash_file(path: Path, into) -> int:
    """Feed the file's bytes into `into`; return its size."""
    size = 0
    try:
        with open(path, "rb") as fh:
            while block := fh.read(READ_BYTES):
                into.update(block)
                size += len(block)
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror}); fix or remove it and rerun") from None
    return size


def fingerprint(data: dict) -> dict:
    """{"dataset", "path", "files", "bytes", "sha256"} of the source as it is now ("missing" when its path is
    not there: prepare names that problem; "bundled" when it reads nothing from disk)."""
    path = source_path(data)
    facts = {"dataset": data["dataset"], "path": data.get("path")}
    if path is None:
        return facts | {"bundled": True}
    if not path.exists():
        return facts | {"missing": str(path)}
    digest, total, files = hashlib.sha256(), 0, source_files(path)
    for name, file in files:
        content = hashlib.sha256()
        size = _hash_file(file, content)
        digest.update(f"{name}\0{size}\0{content.hexdigest()}\n".encode())
        total += size
    return facts | {"files": len(files), "bytes": total, "sha256": digest.hexdigest()}


def main(params: dict) -> dict:
    """Entry point of `imgclf fingerprint` (the DVC fingerprint stage)."""
    facts = fingerprint(params["data"])
    write_json(FINGERPRINT_JSON, facts)
    what = ("bundled, nothing on disk" if facts.get("bundled") else f"{facts['missing']} is missing"
            if "missing" in facts else f"{facts['files']} files, {facts['bytes']:,} bytes, sha256 {facts['sha256'][:12]}")
    print(f"Fingerprint of the {facts['dataset']} source: {what} -> {FINGERPRINT_JSON}")
    return facts
