"""`data.dataset: digits`: scikit-learn's bundled 1,797 8x8 digits, offline, as 32x32 RGB."""

from __future__ import annotations

import numpy as np

from imgclf.files.digests import sha256_array, sha256_bytes
from imgclf.data.images import check_labels, to_uint8_rgb
from imgclf.data.sources import REGISTRY, DataSource, Source


def load_digits_source(data: dict | None = None) -> Source:
    """sklearn's digits, 0..16 scaled to 0..255 and upscaled 4x (nearest neighbour) to 32x32 RGB."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes ~1 s and ~190 MB

    digits = load_digits()
    images = np.rint(digits.images * 255.0 / 16.0)
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # nearest-neighbour 8x8 -> 32x32
    x = to_uint8_rgb(images, "sklearn digits")
    y = check_labels(digits.target, "sklearn digits", 10)
    sha = sha256_bytes(f"{sha256_array(digits.images)}\n{sha256_array(digits.target)}\n".encode())
    return Source(x, y, [str(i) for i in range(10)], {"path": None, "sha256": sha})


REGISTRY.register("digits", DataSource(load=load_digits_source, fixed_size=32))
