"""`data.dataset: folder`: a train/<class>/* image folder (optional test/<class>/*), as Keras'
`image_dataset_from_directory` reads it. Images of any size or mode become data.image_size RGB."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imgclf.errors import DataError
from imgclf.files import sha256_bytes
from imgclf.images import DEFAULT_SIZE, decode_image
from imgclf.sources import REGISTRY, DataSource, Source, existing_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _unreadable(path: Path, exc: OSError) -> DataError:
    """One line for a file or folder the OS refuses (broken symlink, symlink loop, permissions)."""
    hint = "; a broken symlink?" if path.is_symlink() and not path.exists() else ""
    return DataError(f"{path}: unreadable ({exc.strerror or exc}{hint}); fix or remove it")


def _refuse_folder(exc: OSError) -> None:
    # os.walk skips a folder it cannot list unless told otherwise: its images would vanish silently
    raise _unreadable(Path(exc.filename), exc)


def _class_images(class_dir: Path) -> list[Path]:
    """Image files under class_dir (recursively, like Keras), sorted; dotfiles skipped, others refused."""
    images = []
    for root, dirs, names in os.walk(class_dir, onerror=_refuse_folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root, name)
            if name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}); remove it")
            images.append(path)
    if not images:
        raise DataError(f"{class_dir}: empty class folder; add images to it or remove it")
    return sorted(images, key=lambda p: p.relative_to(class_dir).as_posix())


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
    per_class = [_class_images(split_dir / name) for name in classes]
    files = [path for paths in per_class for path in paths]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(paths) for paths in per_class])
    return classes, files, labels


def _decode_files(files: list[Path], root: Path, hashes: list[str], size: int) -> np.ndarray:
    """Decode `files` in order into one array, appending "relpath:sha256" lines to `hashes`."""
    x = np.empty((len(files), size, size, 3), np.uint8)
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()  # read once: hashed and decoded from the same bytes
        except OSError as exc:
            raise _unreadable(path, exc) from None
        hashes.append(f"{path.relative_to(root).as_posix()}:{sha256_bytes(data)}")
        x[i] = decode_image(data, path, size)
    return x


def load_folder(path: str | Path, size: int = DEFAULT_SIZE) -> Source:
    """A train/<class>/* folder (optional test/<class>/*), the layout of Keras image_dataset_from_directory."""
    root = Path(path)
    if not (root / "train").is_dir():
        raise DataError(f"{root / 'train'}: not found; data.path must hold train/<class>/ image folders")
    classes, files, y = _list_split(root / "train")
    hashes: list[str] = []
    x = _decode_files(files, root, hashes, size)
    test = None
    if (root / "test").is_dir():
        test_classes, test_files, test_y = _list_split(root / "test")
        if test_classes != classes:
            extra = sorted(set(test_classes) ^ set(classes))
            raise DataError(
                f"{root / 'test'}: class folders differ from train/ ({', '.join(extra)}); use the same class names"
            )
        test = (_decode_files(test_files, root, hashes, size), test_y)
    sha = sha256_bytes("".join(f"{line}\n" for line in sorted(hashes)).encode())
    return Source(x, y, classes, {"path": str(path), "sha256": sha}, test)


def load(data: dict) -> Source:
    """params["data"] -> the folder at data.path, images resized to data.image_size."""
    return load_folder(existing_path(data, "a folder with train/<class>/ images", is_dir=True), data["image_size"])


REGISTRY.register("folder", DataSource(load=load))
