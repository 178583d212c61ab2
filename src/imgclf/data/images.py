"""Images and labels as the pipeline stores them: uint8 (N, S, S, 3) RGB and int64 labels, checked.

Shared by the data sources (prepare) and `imgclf predict`, so a predicted image is converted exactly
like a training image of the folder source.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgclf.errors import DataError, one_line

DEFAULT_SIZE = 32  # CIFAR-10's size, and the report's net's only one
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # what the folder source and `imgclf predict DIR` read
# A few hundred bytes of PNG can declare 20000x20000 pixels (a "decompression bomb"). Pillow only warns up
# to 179 Mpx (~0.5 GB as RGB); the pipeline's images are at most 1024 px square, so a far larger source
# image is refused from its header, before any pixel is decoded. 40 Mpx (~120 MB as RGB) still takes any
# ordinary camera photo; larger scans must be downscaled first.
MAX_PIXELS = 40_000_000


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
    integral = x.dtype.kind in "iu" or (x.dtype.kind == "f" and bool(np.all(np.isfinite(x) & (x == np.round(x)))))
    if not integral or (x.size and (x.min() < 0 or x.max() > 255)):
        raise DataError(f"{what}: pixels must be integers in 0..255 (got {x.dtype}); scale them to 0..255 first")
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


def decode_image(data: bytes, path: Path, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One encoded image -> uint8 (size, size, 3): fully decoded, converted to RGB, resized if needed."""
    try:
        with Image.open(BytesIO(data)) as img:
            _check_pixels(img, path)
            img.load()  # force the full decode so truncated files fail here, not later
            rgb = img.convert("RGB")
    except DataError:
        raise
    except Exception as exc:  # PIL signals malformed files with many exception types
        reason = "unknown image format" if isinstance(exc, UnidentifiedImageError) else one_line(exc)
        raise DataError(f"{path}: unreadable or truncated image ({reason}); re-export or remove it") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _check_pixels(img: Image.Image, path: Path) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS (read before any pixel is decoded)."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise DataError(f"{path}: {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} Mpx an image may "
                        "have (a decompression bomb?); downscale it or remove it")


def load_image(path: str | Path, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One image file (any size or mode) -> uint8 (size, size, 3), as the folder source would store it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({one_line(exc)}); check the path") from None
    return decode_image(data, path, size)
