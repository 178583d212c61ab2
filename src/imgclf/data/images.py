"""Images and labels as the pipeline stores them: uint8 (N, S, S, 3) RGB and int64 labels, checked.

Shared by the data sources (prepare), `imgclf predict` and the served model, so a predicted image is converted
exactly like a training image of the folder source, under the same input policy (data/policy.py).
"""

from __future__ import annotations

import os
import stat
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgclf.data.policy import IMAGE_SUFFIXES, MAX_FILE_BYTES, MAX_PIXELS, PILLOW_FORMATS, pixel_problem
from imgclf.errors import DataError, one_line

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "check_labels", "check_pair", "decode_image", "header_pixels",
           "load_image", "read_image_file", "to_uint8_rgb"]

DEFAULT_SIZE = 32  # CIFAR-10's size, and the report's net's only one


def check_labels(y: Any, what: str, num_classes: int | None = None) -> np.ndarray:
    """Return labels as a 1-D int64 array; non-integers, negatives or labels >= num_classes -> DataError."""
    try:
        y = np.asarray(y)
    except ValueError as exc:
        raise DataError(f"{what}: labels are not a flat list of integers ({one_line(exc)}); fix the labels") from None
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


def to_uint8_rgb(x: Any, what: str, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Return images as uint8 (N, size, size, 3); grayscale is replicated, non-0..255 integers -> DataError."""
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.shape[1:] == (size, size, 3) or (x.ndim == 3 and x.shape[1:] == (size, size))):
        hint = f"resize them to {size}x{size}"
        if x.ndim in (3, 4) and x.shape[1] == x.shape[2] and x.shape[1] != size:
            hint += f" or set data.image_size: {x.shape[1]}"
        raise DataError(
            f"{what}: images have shape {x.shape}, expected (N, {size}, {size}, 3), (N, {size}, {size}, 1) or "
            f"(N, {size}, {size}); {hint}"
        )
    if problem := pixel_problem(x):
        raise DataError(f"{what}: pixels must be integers in 0..255 (got {x.dtype}: {problem}); scale them to "
                        "0..255 first")
    x = x.astype(np.uint8, copy=False)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    return np.ascontiguousarray(x)


def check_pair(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str, where: str) -> None:
    """Images and labels must pair up one to one."""
    if len(x) != len(y):
        raise DataError(
            f"{where}: {x_name} has {len(x)} images but {y_name} has {len(y)} labels; save arrays of equal length"
        )


def _open(data: bytes, path: Path) -> Image.Image:
    """The image in `data`, its header read, no pixel decoded: one of the policy's formats, within MAX_PIXELS."""
    try:
        img = Image.open(BytesIO(data), formats=PILLOW_FORMATS)
    except Exception as exc:  # PIL signals malformed files with many exception types
        raise _unreadable(path, exc) from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise DataError(f"{path}: {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} Mpx an image may "
                        "have (a decompression bomb?); downscale it or remove it")
    return img


def _unreadable(path: Path, exc: Exception) -> DataError:
    if isinstance(exc, UnidentifiedImageError):
        reason = f"unknown image format: not {', '.join(PILLOW_FORMATS[:-1])} or {PILLOW_FORMATS[-1]}"
    else:
        reason = one_line(exc)
    return DataError(f"{path}: unreadable or truncated image ({reason}); re-export or remove it")


def header_pixels(data: bytes, path: Path) -> int:
    """The pixels an encoded image's header declares (its format and MAX_PIXELS checked), nothing decoded."""
    with _open(data, path) as img:
        return img.size[0] * img.size[1]


def decode_image(data: bytes, path: Path, size: int = DEFAULT_SIZE, sides: list[int] | None = None) -> np.ndarray:
    """One encoded image -> uint8 (size, size, 3): fully decoded, converted to RGB, resized if needed. Its shorter
    side before the resize is appended to `sides` when given (prepare says when the images are far larger)."""
    with _open(data, path) as img:
        if sides is not None:
            sides.append(min(img.size))
        try:
            img.load()  # force the full decode so truncated files fail here, not later
            rgb = img.convert("RGB")
        except Exception as exc:
            raise _unreadable(path, exc) from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def read_image_file(path: str | Path) -> bytes:
    """A file's bytes, if it is a regular file of at most MAX_FILE_BYTES: a FIFO, a device (/dev/zero) or a huge
    file is refused from its stat, before a byte is read (it could hang, or fill memory). Opened without blocking
    (a FIFO swapped in after a check would block the open) and read no further than the limit."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({one_line(exc)}); fix the path or remove it") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device"
            raise DataError(f"{path}: not a regular file ({kind}); name an image file")
        if st.st_size > MAX_FILE_BYTES:
            raise DataError(f"{path}: {st.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} an image file may have; "
                            "downscale it or remove it")
        data = fh.read(MAX_FILE_BYTES + 1)  # a file that grew since its stat is still read only this far
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{path}: more than the {MAX_FILE_BYTES:,} bytes an image file may have; downscale it or "
                        "remove it")
    return data


def load_image(path: str | Path, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One image file (any size or mode) -> uint8 (size, size, 3), as the folder source would store it."""
    return decode_image(read_image_file(path), Path(path), size)
