"""A request to the served model, as MLflow hands it over, turned into the images the net takes, under the input
policy (data/policy.py); anything else is a BadRequest: HTTP 400 with one line saying what was expected.

MLflow parses the JSON first, each form its own way: `inputs`/`instances` become a numpy array (an object array
when the items are not all numbers, a dict for named inputs), `dataframe_split`/`dataframe_records` a pandas
table. Whatever shape that leaves, no error of ours escapes but a BadRequest: MLflow would answer any other with
its generic message and the whole stack trace.
"""

from __future__ import annotations

import base64
import binascii
import numbers
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from imgclf.data.images import decode_image, header_pixels
from imgclf.data.policy import PILLOW_FORMATS, RequestLimits, pixel_problem
from imgclf.errors import DataError, one_line

ENCODED = "base64-encoded images (" + ", ".join(PILLOW_FORMATS) + ")"


class BadRequest(MlflowException):
    """HTTP 400 with our one line only: the scoring server prepends the whole request to an MlflowException's
    message (`Failed to predict data '<the array>'`), so this message ignores that assignment."""

    def __init__(self, message: str):
        self._line = " ".join(message.split())  # one line, whatever went into it
        super().__init__(self._line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        pass


def _kind(item) -> str:
    """What a JSON value is, in JSON's words, for a message."""
    if item is None:
        return "null"
    if isinstance(item, (bool, np.bool_)):
        return "a boolean"
    if isinstance(item, numbers.Number):
        return "a number"
    if isinstance(item, (str, bytes)):
        return "a string"
    return "an object" if isinstance(item, dict) else "a list"


def _column(model_input):
    """The images of a request: a tensor, the only (or `image`) column of a table, the `image` named input."""
    if isinstance(model_input, dict):  # `inputs` given as named tensors
        if "image" not in model_input:
            raise BadRequest(f"named inputs {sorted(map(str, model_input))[:5]}; send `inputs` as a list of images "
                             "(or one named `image`)")
        return _column(model_input["image"])
    if hasattr(model_input, "columns"):  # pandas: dataframe_split/records, or `inputs` given as a list of strings
        columns = [str(c) for c in model_input.columns]
        name = "image" if "image" in columns else columns[0] if len(columns) == 1 else None
        if name is None:
            raise BadRequest(f"a table with columns {columns[:5]}: send one column `image` of {ENCODED}")
        return _strings(model_input[name].tolist(), f"column `{name}`")
    x = np.asarray(model_input)
    if x.dtype.kind in "OUS" and x.ndim == 1:
        return _strings(x.tolist(), "the request")
    if x.dtype.kind in "US" or x.ndim == 0:
        what = "one value" if x.ndim == 0 else f"a {x.ndim}-D array of strings"
        raise BadRequest(f"{what}; send a list of {ENCODED}, or a batch of RGB pixels 0-255")
    if x.dtype.kind != "O":
        return x
    # numbers too large for int64, or numbers mixed with other values (null would become NaN as a float)
    others = [item for item in x.flat if not isinstance(item, numbers.Real) or isinstance(item, bool)][:1]
    if others:
        raise BadRequest(f"a {x.ndim}-D array holding {_kind(others[0])} among numbers; send a batch of RGB pixels "
                         f"0-255 or a list of {ENCODED}")
    return np.asarray(x, dtype=np.float64)


def _strings(items: list, where: str) -> np.ndarray:
    """A list that must hold encoded images only: the first item that is not a string is named."""
    for i, item in enumerate(items):
        if not isinstance(item, (str, bytes)):
            raise BadRequest(f"image {i} in {where} is {_kind(item)}; send {ENCODED} as strings")
    return np.array(items, dtype=object)


def _encoded(items: np.ndarray, size: int, limits: RequestLimits) -> np.ndarray:
    """Encoded images -> pixels: every limit checked on the bytes and the headers before any image is decoded."""
    total = sum(len(item) for item in items)
    if total > limits.max_request_bytes:
        raise BadRequest(f"{total:,} bytes of encoded images, more than the {limits.max_request_bytes:,} a request "
                         "may hold; send fewer or smaller images per request")
    data, pixels = [], 0
    for i, item in enumerate(items):
        try:
            data.append(item if isinstance(item, bytes) else base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"image {i}: not base64; send {ENCODED} as base64 strings") from None
        pixels += _image_step(header_pixels, data[-1], i)
        if pixels > limits.max_request_pixels:
            raise BadRequest(f"images 0-{i} declare {pixels:,} pixels, more than the {limits.max_request_pixels:,} "
                             "a request may hold; send fewer or smaller images per request")
    return np.stack([_image_step(decode_image, blob, i, size) for i, blob in enumerate(data)])


def _image_step(step, data: bytes, i: int, *args):
    """One image's header read or decode; a bad image is a BadRequest naming it."""
    try:
        return step(data, Path(f"image {i}"), *args)
    except DataError as exc:
        raise BadRequest(str(exc).split(";")[0] + f"; send {ENCODED}") from None


def _pixels(x: np.ndarray, size: int) -> np.ndarray:
    """A numeric batch -> uint8 pixels, if it has the net's shape and training's values."""
    expected = f"a batch of shape (N, {size}, {size}, 3), RGB pixels 0-255"
    if x.dtype.kind not in "uif":
        raise BadRequest(f"{x.dtype} values; send {expected}")
    if x.ndim == 3 and x.shape == (size, size, 3):
        raise BadRequest(f"one image of shape {x.shape} without the batch axis; send {expected}: [[...]]")
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise BadRequest(f"shape {x.shape}; send {expected}, or {ENCODED} of any size")
    if problem := pixel_problem(x):
        if x.dtype.kind == "f" and np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1:
            raise BadRequest(f"pixels from {x.min():g} to {x.max():g} look scaled to [0, 1]; send 0-255 values "
                             "(multiply by 255 and round)")
        raise BadRequest(f"{problem}; send {expected}")
    return x.astype(np.uint8)


def to_images(model_input, size: int, limits: RequestLimits = RequestLimits()) -> np.ndarray:
    """(N, size, size, 3) uint8 pixels 0-255 from a request; a BadRequest naming what was expected otherwise."""
    try:
        x = _column(model_input)
        if len(x.shape) and len(x) > limits.max_images:
            raise BadRequest(f"{len(x):,} images, more than the {limits.max_images:,} a request may hold; send "
                             "them in several requests")
        if x.dtype.kind == "O":
            return _encoded(x, size, limits) if len(x) else np.zeros((0, size, size, 3), np.uint8)
        return _pixels(x, size)
    except BadRequest:
        raise
    except Exception as exc:  # a shape no check above foresaw: still the request's fault, still one line
        raise BadRequest(f"an unreadable request ({type(exc).__name__}: {one_line(exc)[:200]}); send a batch of "
                         f"RGB pixels 0-255 or a list of {ENCODED}") from None
