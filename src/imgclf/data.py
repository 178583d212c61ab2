"""The `prepare` stage: a data source -> seeded, stratified uint8 arrays plus manifest.json.

Sources: the bundled sklearn digits, the official CIFAR-10 python archive, a folder laid out
as train/<class>/* (optional test/<class>/*), or a .npz of arrays. Every bad input raises
DataError with one line naming the culprit and the fix. Nothing here imports TensorFlow, so the
stage stays light. Untrusted pickles (CIFAR batches) go through a restricted unpickler.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import shutil
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgclf.io import ImgclfError, atomic_write, new_temp_dir, replace_dir, sha256_array, sha256_bytes
from imgclf.io import sha256_file, write_json

PREPARED_DIR = "data/prepared"
IMAGE_SHAPE = (32, 32, 3)
MANIFEST = "manifest.json"
SPLITS = ("train", "dev", "test")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MD5_ENV = "IMGCLF_CIFAR10_MD5"  # the expected md5 of a re-packed archive, instead of the official one
CIFAR10_DEFAULT_PATH = "data/raw/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"{CIFAR10_DIR}/data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = f"{CIFAR10_DIR}/test_batch"
CIFAR10_META = f"{CIFAR10_DIR}/batches.meta"
CIFAR10_CLASSES = 10
# A real batch is ~31 MB; anything far larger is not a CIFAR batch and could exhaust memory.
MAX_MEMBER_BYTES = 256 << 20

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

# What a numpy-array pickle legitimately needs, resolved from numpy itself so the names work on
# numpy 1 (numpy.core) and 2 (numpy._core) without importing deprecated modules.
_PICKLE_GLOBALS = {
    "_reconstruct": np.zeros(1).__reduce__()[0],
    "_frombuffer": np.zeros(1).__reduce_ex__(5)[0],  # protocol-5 array pickles
    "scalar": np.float64(0).__reduce__()[0],
    "ndarray": np.ndarray,
    "dtype": np.dtype,
}
_PICKLE_MODULES = {
    "_reconstruct": ("numpy.core.multiarray", "numpy._core.multiarray"),
    "_frombuffer": ("numpy.core.numeric", "numpy._core.numeric"),
    "scalar": ("numpy.core.multiarray", "numpy._core.multiarray"),
    "ndarray": ("numpy",),
    "dtype": ("numpy",),
}


class DataError(ImgclfError):
    """The data source or the prepared arrays are missing, malformed or unsafe."""


@dataclass
class Source:
    """One loaded data set: the training pool, the optional test split, class names, provenance."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    info: dict[str, Any]
    test: tuple[np.ndarray, np.ndarray] | None = field(default=None)


def _one_line(exc: BaseException) -> str:
    """An exception's text squeezed onto one line (messages must stay one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


# --- shared checks --------------------------------------------------------------------------


def _check_labels(y: Any, what: str, num_classes: int | None = None) -> np.ndarray:
    """Return labels as a 1-D int64 array; non-integers, negatives or labels >= num_classes -> DataError."""
    try:
        y = np.asarray(y)
    except ValueError as exc:
        raise DataError(f"{what}: labels are not a flat list of integers ({_one_line(exc)}); fix the labels") from None
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style (N, 1) label columns
        y = y[:, 0]
    integral = y.dtype.kind in "iu" or (y.dtype.kind == "f" and bool(np.all(np.isfinite(y) & (y == np.round(y)))))
    if y.ndim != 1 or not integral:
        raise DataError(f"{what}: labels must be a 1-D array of integers, got {y.dtype} {y.shape}; fix the labels")
    if y.size and y.min() < 0:
        raise DataError(f"{what}: negative label {int(y.min())}; labels must be 0..num_classes-1")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise DataError(
            f"{what}: label {int(y.max())} out of range for {num_classes} classes; labels must be 0..{num_classes - 1}"
        )
    return y.astype(np.int64)


def _to_uint8_rgb(x: Any, what: str) -> np.ndarray:
    """Return images as uint8 (N, 32, 32, 3); grayscale is replicated, non-0..255 integers -> DataError."""
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.shape[1:] == IMAGE_SHAPE or (x.ndim == 3 and x.shape[1:] == IMAGE_SHAPE[:2])):
        raise DataError(
            f"{what}: images have shape {x.shape}, expected (N, 32, 32, 3), (N, 32, 32, 1) or (N, 32, 32); "
            "resize them to 32x32"
        )
    integral = x.dtype.kind in "iu" or (x.dtype.kind == "f" and bool(np.all(np.isfinite(x) & (x == np.round(x)))))
    if not integral or (x.size and (x.min() < 0 or x.max() > 255)):
        raise DataError(f"{what}: pixels must be integers in 0..255 (got {x.dtype}); scale them to 0..255 first")
    x = x.astype(np.uint8, copy=False)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    return np.ascontiguousarray(x)


def _check_pair(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str, where: str) -> None:
    """Images and labels must pair up one to one."""
    if len(x) != len(y):
        raise DataError(
            f"{where}: {x_name} has {len(x)} images but {y_name} has {len(y)} labels; save arrays of equal length"
        )


# --- digits ---------------------------------------------------------------------------------


def load_digits_source() -> Source:
    """sklearn's bundled 8x8 digits, scaled to 0..255 and upscaled 4x to 32x32 RGB."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes ~1 s and ~190 MB

    digits = load_digits()
    images = np.rint(digits.images * 255.0 / 16.0)
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # nearest-neighbour 8x8 -> 32x32
    x = _to_uint8_rgb(images, "sklearn digits")
    y = _check_labels(digits.target, "sklearn digits", 10)
    sha = sha256_bytes(f"{sha256_array(digits.images)}\n{sha256_array(digits.target)}\n".encode())
    return Source(x, y, [str(i) for i in range(10)], {"path": None, "sha256": sha})


# --- cifar10 --------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    def __init__(self, file: Any, member: str) -> None:
        """Bytes keys, as CIFAR's Python 2 pickles need; `member` names the file in errors."""
        super().__init__(file, encoding="bytes")
        self.member = member

    def find_class(self, module: str, name: str) -> Any:
        """Allow only numpy's array-rebuilding globals; anything else could run code."""
        if module in _PICKLE_MODULES.get(name, ()):
            return _PICKLE_GLOBALS[name]
        raise DataError(
            f"{self.member}: refused to load global {module}.{name} (not a plain CIFAR batch; "
            "the file may be malicious); use the official cifar-10-python.tar.gz"
        )


def _unpickle(data: bytes, member: str) -> Any:
    """Unpickle one archive member with the restricted unpickler."""
    try:
        return _SafeUnpickler(BytesIO(data), member).load()
    except DataError:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything; all mean "corrupt"
        raise DataError(f"{member}: not a readable pickle ({_one_line(exc)}); re-download the archive") from None


def _download(url: str, path: Path) -> None:
    """Fetch `url` to `path` through a temp file, so a failed download leaves nothing behind."""

    def write(tmp: Path) -> None:
        """Stream the response into the temp file."""
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 20)

    print(f"{path}: not found, downloading {url}", file=sys.stderr)
    try:
        atomic_write(path, write)
    except Exception as exc:  # URLError, timeouts, HTTP errors, bad URLs: all mean "no archive"
        raise DataError(
            f"{path}: not found and could not be downloaded ({_one_line(exc)}); download "
            "cifar-10-python.tar.gz by hand and put it there, or set data.path"
        ) from None


def _md5_file(path: Path) -> str:
    """Streaming md5 (the checksum CIFAR-10 publishes)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def _read_members(archive: Path, decoders: dict[str, Callable[[bytes, str], Any]]) -> dict[str, Any]:
    """Read and decode the wanted members straight from the tar, never extracting anything to disk.

    Each member is decoded as soon as it is read, so only one member's raw bytes are in memory at once.
    """
    found: dict[str, Any] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # read to the end so the gzip trailer and CRC get checked
                name = member.name.removeprefix("./")
                if name not in decoders:
                    continue
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{archive}: {name} is not a regular file of sane size; use the official archive")
                found[name] = decoders[name](tar.extractfile(member).read(), f"{archive}: {name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"{archive}: truncated or not a gzip tar archive ({_one_line(exc)}); "
            "re-download it or point data.path at a good copy"
        ) from None
    missing = sorted(set(decoders) - set(found))
    if missing:
        raise DataError(f"{archive}: member {missing[0]} missing; use the official cifar-10-python.tar.gz")
    return found


def _cifar_batch(data: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode and validate one CIFAR batch: uint8 (N, 3072) rows plus N labels in 0..9."""
    batch = _unpickle(data, member)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{member}: not a CIFAR batch (needs keys b'data' and b'labels'); re-download the archive")
    rows = batch[b"data"]
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        got = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
        raise DataError(f"{member}: data must be uint8 of shape (N, 3072), got {got}; re-download the archive")
    labels = _check_labels(batch[b"labels"], member, CIFAR10_CLASSES)
    _check_pair(rows, labels, "data", "labels", member)
    # Rows are channel-first (R plane, G plane, B plane); models want channels last.
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_classes(data: bytes, member: str) -> list[str]:
    """The ten label names from batches.meta."""
    meta = _unpickle(data, member)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != CIFAR10_CLASSES or not all(isinstance(n, bytes) for n in names):
        raise DataError(f"{member}: needs b'label_names', a list of 10 byte strings; re-download the archive")
    return [n.decode("utf-8", "replace") for n in names]


def load_cifar10(path: str | Path | None = None, expected_md5: str | None = None) -> Source:
    """The CIFAR-10 python archive (downloaded once if absent), md5-checked, read without extracting.

    The md5 expected is `expected_md5`, else $IMGCLF_CIFAR10_MD5, else the official archive's.
    """
    expected_md5 = expected_md5 or os.environ.get(CIFAR10_MD5_ENV) or CIFAR10_MD5
    archive = Path(path or CIFAR10_DEFAULT_PATH)
    if not archive.exists():
        _download(CIFAR10_URL, archive)
    if not archive.is_file():
        raise DataError(f"{archive}: not a file; set data.path to cifar-10-python.tar.gz")
    md5 = _md5_file(archive)
    if md5 != expected_md5:
        raise DataError(
            f"{archive}: md5 {md5} != expected {expected_md5} (corrupt or not the official archive); "
            "re-download cifar-10-python.tar.gz or point data.path at a good copy"
        )
    decoders = {name: _cifar_batch for name in (*CIFAR10_TRAIN, CIFAR10_TEST)} | {CIFAR10_META: _cifar_classes}
    members = _read_members(archive, decoders)
    batches = [members.pop(name) for name in CIFAR10_TRAIN]
    test = members.pop(CIFAR10_TEST)
    y = np.concatenate([b[1] for b in batches])
    # One copy, straight into C order: concatenating the transposed views keeps their layout, and making
    # that contiguous afterwards would hold the training images twice.
    x = np.concatenate([b[0] for b in batches], out=np.empty((len(y), *IMAGE_SHAPE), np.uint8))
    info = {"path": str(path or CIFAR10_DEFAULT_PATH), "sha256": sha256_file(archive), "md5": md5}
    return Source(x, y, members[CIFAR10_META], info, (np.ascontiguousarray(test[0]), test[1]))


# --- folder ---------------------------------------------------------------------------------


def _class_images(class_dir: Path) -> list[Path]:
    """Image files under class_dir (recursively, like Keras), sorted; dotfiles skipped, others refused."""
    images = []
    for root, dirs, names in os.walk(class_dir):
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
    for entry in sorted(split_dir.iterdir(), key=lambda p: p.name):
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


def _decode_image(data: bytes, path: Path) -> np.ndarray:
    """One encoded image -> uint8 (32, 32, 3): fully decoded, converted to RGB, resized if needed."""
    try:
        with Image.open(BytesIO(data)) as img:
            img.load()  # force the full decode so truncated files fail here, not later
            rgb = img.convert("RGB")
    except Exception as exc:  # PIL signals malformed files with many exception types
        reason = "unknown image format" if isinstance(exc, UnidentifiedImageError) else _one_line(exc)
        raise DataError(f"{path}: unreadable or truncated image ({reason}); re-export or remove it") from None
    if rgb.size != IMAGE_SHAPE[1::-1]:
        rgb = rgb.resize(IMAGE_SHAPE[1::-1], Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """One image file (any size or mode) -> uint8 (32, 32, 3), as the folder source would store it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({_one_line(exc)}); check the path") from None
    return _decode_image(data, path)


def _decode_files(files: list[Path], root: Path, hashes: list[str]) -> np.ndarray:
    """Decode `files` in order into one array, appending "relpath:sha256" lines to `hashes`."""
    x = np.empty((len(files), *IMAGE_SHAPE), np.uint8)
    for i, path in enumerate(files):
        data = path.read_bytes()  # read once: hashed and decoded from the same bytes
        hashes.append(f"{path.relative_to(root).as_posix()}:{sha256_bytes(data)}")
        x[i] = _decode_image(data, path)
    return x


def load_folder(path: str | Path) -> Source:
    """A train/<class>/* folder (optional test/<class>/*), the layout of Keras image_dataset_from_directory."""
    root = Path(path)
    if not (root / "train").is_dir():
        raise DataError(f"{root / 'train'}: not found; data.path must hold train/<class>/ image folders")
    classes, files, y = _list_split(root / "train")
    hashes: list[str] = []
    x = _decode_files(files, root, hashes)
    test = None
    if (root / "test").is_dir():
        test_classes, test_files, test_y = _list_split(root / "test")
        if test_classes != classes:
            extra = sorted(set(test_classes) ^ set(classes))
            raise DataError(
                f"{root / 'test'}: class folders differ from train/ ({', '.join(extra)}); use the same class names"
            )
        test = (_decode_files(test_files, root, hashes), test_y)
    sha = sha256_bytes("".join(f"{line}\n" for line in sorted(hashes)).encode())
    return Source(x, y, classes, {"path": str(path), "sha256": sha}, test)


# --- npz ------------------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The known arrays of a .npz, loaded without pickle; unreadable files or arrays -> DataError."""
    hint = "save it with np.savez(path, x_train=..., y_train=...)"
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz ({_one_line(exc)}); {hint}") from None
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
                msg = f"{path}: {key} unreadable ({_one_line(exc)}); store plain numeric/str arrays"
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


def load_npz(path: str | Path) -> Source:
    """A .npz with x_train, y_train and optional x_test, y_test, class_names."""
    arrays = _read_npz(Path(path))
    splits = [s for s in ("train", "test") if f"x_{s}" in arrays]
    ys = {s: _check_labels(arrays[f"y_{s}"], f"{path}: y_{s}") for s in splits}
    classes = _npz_classes(arrays.get("class_names"), list(ys.values()), Path(path))
    pairs = {}
    for s in splits:
        x = _to_uint8_rgb(arrays[f"x_{s}"], f"{path}: x_{s}")
        _check_pair(x, ys[s], f"x_{s}", f"y_{s}", str(path))
        pairs[s] = (x, _check_labels(ys[s], f"{path}: y_{s}", len(classes)))
    info = {"path": str(path), "sha256": sha256_file(path)}
    return Source(*pairs["train"], classes, info, pairs.get("test"))


# --- prepare --------------------------------------------------------------------------------


def _existing_path(path: str | None, dataset: str) -> Path:
    """data.path for folder/npz: set, present and of the right kind."""
    want = "a folder with train/<class>/ images" if dataset == "folder" else "a .npz file"
    if path is None or not Path(path).exists():
        where = "data.path is null" if path is None else f"{path}: not found"
        raise DataError(f"{where}; set data.path to {want} (dataset: {dataset})")
    if Path(path).is_dir() != (dataset == "folder"):
        raise DataError(f"{path}: not {want}; set data.path to {want} (dataset: {dataset})")
    return Path(path)


def load_source(data: dict) -> Source:
    """Load the source that params["data"] names."""
    dataset = data.get("dataset")
    if dataset == "digits":
        return load_digits_source()
    if dataset == "cifar10":
        return load_cifar10(data.get("path") or CIFAR10_DEFAULT_PATH)
    if dataset in ("folder", "npz"):
        path = _existing_path(data.get("path"), dataset)
        return load_folder(path) if dataset == "folder" else load_npz(path)
    raise DataError(f"data.dataset={dataset!r}: unknown; set it to digits, cifar10, folder or npz")


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
            f"({_one_line(exc)}); raise data.max_train_samples or data.dev_fraction, or add images of that class"
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
        "image_shape": list(IMAGE_SHAPE),
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
    return write_prepared(load_source(params["data"]), params, out_dir)


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
        manifest = _write_splits(tmp, splits, source, params)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace_dir
    return manifest


def load_prepared(prepared_dir: str | Path = PREPARED_DIR) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """({"train": (x, y), "dev": (x, y)[, "test": (x, y)]}, manifest), each array checked against the manifest."""
    folder = Path(prepared_dir)
    fix = "run `dvc repro prepare` (or `imgclf prepare`)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / MANIFEST}: missing or unreadable ({_one_line(exc)}); {fix}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{folder / MANIFEST}: not a prepare manifest; {fix}")
    splits = {}
    for split in (s for s in SPLITS if s in manifest.get("splits", {})):
        pair = []
        for name in (f"x_{split}.npy", f"y_{split}.npy"):
            try:
                array = np.load(folder / name, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise DataError(f"{folder / name}: missing or unreadable ({_one_line(exc)}); {fix}") from None
            if sha256_array(array) != manifest.get("arrays", {}).get(name):
                raise DataError(f"{folder / name}: does not match {MANIFEST} (changed since prepare); {fix}")
            pair.append(array)
        splits[split] = (pair[0], pair[1])
    if "train" not in splits or "dev" not in splits:
        raise DataError(f"{folder / MANIFEST}: lists no train/dev splits; {fix}")
    return splits, manifest


def summarize(manifest: dict, out_dir: str | Path) -> str:
    """One paragraph describing a prepared data set."""
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    classes = manifest["classes"]
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return (
        f"Prepared {manifest['dataset']}: {counts} images of {len(classes)} classes ({shown}), "
        f"32x32x3 uint8, seed {manifest['seed']}; written to {out_dir} (digest {manifest['digest'][:12]})."
    )


def main(params: dict, out_dir: str = PREPARED_DIR) -> dict:
    """The prepare stage's entry point (`imgclf prepare`): prepare from validated params, print a summary."""
    manifest = prepare(params, out_dir)
    print(summarize(manifest, out_dir))
    return manifest

