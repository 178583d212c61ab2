"""The input policy: what every door that takes images accepts (`prepare`'s folder source, `imgclf predict`, the
served model). One owner for each limit, so the three never disagree:

FORMATS             the formats, by file suffix and by Pillow's name: the allow-list passed to Image.open, so an
                    image Pillow could open (TIFF, PSD, EPS, which runs Ghostscript where it is installed) but
                    prepare would not read is refused at every door, whatever its name
MAX_PIXELS          pixels per image, read from the header before any pixel is decoded
MAX_FILE_BYTES      the largest image file read (an uncompressed BMP of MAX_PIXELS, with room for its header)
RequestLimits       images, encoded bytes and declared pixels per request of the served model: defaults recorded
                    with the logged model (its model_config), which a person changes when serving
pixel_problem       finite, whole 0-255 values only: what training's uint8 conversion can store
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF"}
IMAGE_SUFFIXES = tuple(FORMATS)  # what the folder source and `imgclf predict DIR` read
PILLOW_FORMATS = tuple(dict.fromkeys(FORMATS.values()))  # Image.open(formats=...): the same formats, nothing else
# A few hundred bytes of PNG can declare 20000x20000 pixels (a "decompression bomb"). Pillow only warns up
# to 179 Mpx (~0.5 GB as RGB); the pipeline's images are at most 1024 px square, so a far larger source
# image is refused from its header, before any pixel is decoded. 40 Mpx (~120 MB as RGB) still takes any
# ordinary camera photo; larger scans must be downscaled first.
MAX_PIXELS = 40_000_000
# 4 bytes a pixel (a 32-bit BMP, the least compact of FORMATS) plus 1 MiB of header and palette: any file larger
# cannot hold an image of MAX_PIXELS, so it is refused from its size before a byte is read.
MAX_FILE_BYTES = 4 * MAX_PIXELS + (1 << 20)


@dataclass(frozen=True)
class RequestLimits:
    """What one request to the served model may ask for. A request within them decodes in about a second on one
    core and holds well under 1 GB; MLflow's scoring timeout would otherwise answer 504 while the thread decodes on.
    Logged in the model's model_config; `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"max_images": 16}' mlflow models serve
    ...` changes them for one server (docs/serving.md)."""

    max_images: int = 256                    # images (rows) per request
    max_request_bytes: int = 32 << 20        # encoded images' base64 text, all of them together
    max_request_pixels: int = 24_000_000     # pixels the images' headers declare, all of them together

    @classmethod
    def from_config(cls, config: dict | None) -> "RequestLimits":
        """The limits in a model_config (a model logged before they were recorded gets the defaults)."""
        config = config or {}
        return cls(**{f.name: int(config[f.name]) for f in fields(cls) if config.get(f.name) is not None})

    def as_config(self) -> dict:
        return asdict(self)


def pixel_problem(x: np.ndarray) -> str | None:
    """Why numeric pixels could not be training's uint8 0-255 values, or None when they can: NaN or infinite,
    outside 0-255, or not whole (training stores integers: 127.5 has no uint8 value)."""
    if x.dtype.kind not in "uif":
        return f"{x.dtype} values"
    if not x.size:
        return None
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        return "NaN or infinite values"
    low, high = x.min(), x.max()
    if low < 0 or high > 255:
        return f"pixels from {low:g} to {high:g}, outside 0-255"
    if x.dtype.kind == "f":
        fractional = x[x != np.round(x)]
        if fractional.size:
            return f"pixels that are not whole numbers (such as {fractional.flat[0]:g})"
    return None
