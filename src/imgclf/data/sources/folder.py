"""`data.dataset: folder`: a train/<class>/* image folder (optional test/<class>/*), as Keras'
`image_dataset_from_directory` reads it. Images of any size or mode become data.image_size RGB."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from imgclf.errors import DataError
from imgclf.files.digests import sha256_bytes
from imgclf.files.walk import walk_files
from imgclf.data.images import DEFAULT_SIZE, IMAGE_SUFFIXES, decode_image, read_image_file
from imgclf.data.sources import REGISTRY, DataSource, Source, existing_path
from imgclf.data.decode_pool import Workers



def _unreadable(path: Path, exc: OSError) -> DataError:
    """One line for a file the OS refuses (permissions, vanished since it was listed)."""
    return DataError(f"{path}: unreadable ({exc.strerror or exc}); fix or remove it")


def _split_images(split_dir: Path, classes: list[str]) -> list[list[Path]]:
    """Each class's image files (recursively, like Keras), sorted by relative path. One walk of the whole split
    (files/walk.py's symlink policy), so a link from one class folder into the split lists no image twice."""
    per_class: dict[str, list[Path]] = {name: [] for name in classes}
    for path in walk_files(split_dir):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}); remove it")
        per_class[path.relative_to(split_dir).parts[0]].append(path)
    for name, images in per_class.items():
        if not images:
            raise DataError(f"{split_dir / name}: empty class folder; add images to it or remove it")
    return list(per_class.values())


def _list_split(split_dir: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names, image files and labels of one split folder laid out as <class>/<image>."""
    classes = []
    try:
        entries = sorted(split_dir.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise _unreadable(split_dir, exc) from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataError(f"{entry}: images must sit in {split_dir}/<class>/ folders; move or remove it")
        classes.append(entry.name)
    if not classes:
        raise DataError(f"{split_dir}: no class folders; put images under {split_dir}/<class>/")
    per_class = _split_images(split_dir, classes)
    files = [path for paths in per_class for path in paths]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(paths) for paths in per_class])
    return classes, files, labels


# Decoded pixels per task: what a worker holds at once before writing them into the .npy, so what prepare's
# memory grows by per worker, whatever the data set's size.
CHUNK_BYTES = 4 << 20
HASH_FILES = 256  # files per task when only hashing them


def _read(path: Path) -> bytes:
    """The image file's bytes under the input policy's bounds (data/images.read_image_file: a FIFO, a device or an
    oversize file is refused before it is read)."""
    try:
        return read_image_file(path)
    except OSError as exc:  # failed while reading, after the open
        raise _unreadable(path, exc) from None


# Images whose median shorter side is this many times data.image_size or more lose most of their detail in the
# resize: prepare says so in one line, naming the key (a photo folder at the default 32 px is the usual case).
LARGER_NOTE_FACTOR = 4


def _decode_chunk(root: Path, files: list[Path], size: int, out: Path, offset: int
                  ) -> tuple[list[tuple[str, str]], list[int]]:
    """In a worker: `files` decoded in order and written into `out` at `offset`; each file's (relpath, sha256),
    and each image's shorter side before the resize.

    The pixels go to the file from here, not back through the parent: the parent's share (its reads to
    hash them) stays small, so the decoding scales with the workers."""
    x = np.empty((len(files), size, size, 3), np.uint8)
    hashes, sides = [], []
    for i, path in enumerate(files):
        data = _read(path)  # read once: hashed and decoded from the same bytes
        hashes.append((path.relative_to(root).as_posix(), sha256_bytes(data)))
        x[i] = decode_image(data, path, size, sides)
    fd = os.open(out, os.O_WRONLY)
    try:
        view = memoryview(x.reshape(-1))
        while view:  # pwrite may write less than asked
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)
    return hashes, sides


def _hash_chunk(root: Path, files: list[Path]) -> list[tuple[str, str]]:
    """In a worker: (relpath, sha256) of files nothing decodes (left out by data.max_train_samples)."""
    return [(path.relative_to(root).as_posix(), sha256_bytes(_read(path))) for path in files]


class FolderImages:
    """A split folder's images as the uint8 (N, size, size, 3) array they decode to (a sources.Images): decoded
    only when prepare writes them, a chunk at a time, on its workers. Each file's sha256 goes to `hashes`."""

    dtype = np.dtype(np.uint8)

    def __init__(self, root: Path, files: list[Path], size: int, hashes: dict[str, str]):
        self.root, self.files, self.size, self.hashes = root, files, size, hashes
        self.sides: list[int] = []  # the decoded images' shorter sides before the resize
        self.shape = (len(files), size, size, 3)

    def __len__(self) -> int:
        return len(self.files)

    def decode_into(self, path: Path, offset: int, rows: np.ndarray, workers: Workers) -> Iterator[int]:
        """Write the images of `rows` into `path` from `offset` on; yield the rows written so far, in order."""
        # a few chunks per worker even for a small set, else one worker would decode it alone
        step = max(1, min(CHUNK_BYTES // (3 * self.size**2), -(-len(rows) // (4 * workers.n))))
        starts = range(0, len(rows), step)
        tasks = ((self.root, [self.files[i] for i in rows[start:start + step]], self.size, path,
                  offset + start * 3 * self.size**2) for start in starts)
        for start, (hashes, sides) in zip(starts, workers.ordered(_decode_chunk, tasks)):
            self.hashes.update(hashes)
            self.sides += sides
            yield min(start + step, len(rows))


def size_note(sides: list[int], size: int) -> str | None:
    """One line when the images are far larger than data.image_size, saying what to set; None otherwise."""
    median = int(np.median(sides)) if sides else 0
    if median < LARGER_NOTE_FACTOR * size:
        return None
    return (f"Note: the images' median shorter side is {median} px, resized to {size}x{size} (data.image_size); "
            f"for more detail set data.image_size (e.g. -S data.image_size={min(4 * size, median)}): memory and "
            "time per epoch grow with its square")


def _digest(root: Path, files: list[Path], hashes: dict[str, str], workers: Workers) -> str:
    """sha256 over the sorted "relpath:sha256" lines of every file; those not decoded are only read now."""
    rest = [path for path in files if path.relative_to(root).as_posix() not in hashes]
    tasks = ((root, rest[start:start + HASH_FILES]) for start in range(0, len(rest), HASH_FILES))
    for done in workers.ordered(_hash_chunk, tasks):
        hashes.update(done)
    lines = sorted(f"{rel}:{sha}" for rel, sha in hashes.items())
    return sha256_bytes("".join(f"{line}\n" for line in lines).encode())


def load_folder(path: str | Path, size: int = DEFAULT_SIZE) -> Source:
    """A train/<class>/* folder (optional test/<class>/*), the layout of Keras image_dataset_from_directory.

    Only lists the files: the images are decoded as prepare writes them, and the digest of every file
    (source.info's sha256) comes from `finish`, once they are written.
    """
    root = Path(path)
    if not (root / "train").is_dir():
        raise DataError(f"{root / 'train'}: not found; data.path must hold train/<class>/ image folders")
    classes, files, y = _list_split(root / "train")
    hashes: dict[str, str] = {}
    x = FolderImages(root, files, size, hashes)
    test, test_files = None, []
    if (root / "test").is_dir():
        test_classes, test_files, test_y = _list_split(root / "test")
        if test_classes != classes:
            extra = sorted(set(test_classes) ^ set(classes))
            raise DataError(
                f"{root / 'test'}: class folders differ from train/ ({', '.join(extra)}); use the same class names"
            )
        test = (FolderImages(root, test_files, size, hashes), test_y)

    def finish(workers: Workers) -> dict:
        note = size_note(x.sides + (test[0].sides if test else []), size)
        if note:
            print(note)
        return {"path": str(path), "sha256": _digest(root, [*files, *test_files], hashes, workers)}

    return Source(x, y, classes, {"path": str(path), "sha256": None}, test, finish)


def load(data: dict) -> Source:
    """params["data"] -> the folder at data.path, images resized to data.image_size."""
    return load_folder(existing_path(data, "a folder with train/<class>/ images", is_dir=True), data["image_size"])


REGISTRY.register("folder", DataSource(load=load))
