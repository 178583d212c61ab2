"""Test-time augmentation (`evaluate.tta`): logits averaged over flipped and shifted views of each image.

none            the image itself
flip            the image and its mirror, 1/2 each
flip_translate  airbench94's six views: the image and its mirror 1/4 each, and both of those shifted one
                pixel up-left and one pixel down-right (reflect padding) 1/8 each
Any model that takes raw 0-255 pixels works; a left-right symmetric image scores as with `none`. Also the class
probabilities every scorer reports, from those logits.
"""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 64 << 20  # float32 pixels per predict call, whatever the split's size

# (weight, mirrored, shift in pixels along both axes) per view
VIEWS = {
    "none": ((1.0, False, 0),),
    "flip": ((0.5, False, 0), (0.5, True, 0)),
    "flip_translate": ((0.25, False, 0), (0.25, True, 0), (0.125, False, -1), (0.125, True, -1),
                       (0.125, False, 1), (0.125, True, 1)),
}


def view(x: np.ndarray, mirrored: bool, shift: int) -> np.ndarray:
    """The images shifted by `shift` pixels down and right (reflect padding), then mirrored."""
    if shift:
        pad = abs(shift)
        padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="reflect")
        start = pad - shift
        x = padded[:, start:start + x.shape[1], start:start + x.shape[2]]
    return x[:, :, ::-1] if mirrored else x


def predict_logits(model, x: np.ndarray, tta: str = "none", batch_size: int = 256) -> np.ndarray:
    """Logits for uint8 images under `tta`; the model scales raw pixels itself.

    The images go through in chunks of whole batches, so only a chunk is ever converted to float32 (a
    memory-mapped split stays on disk) and every batch, hence every logit, is the one a single pass gives.
    """
    per_batch = batch_size * 4 * int(np.prod(x.shape[1:]))
    step = batch_size * max(1, CHUNK_BYTES // per_batch)
    chunks = [_chunk_logits(model, x[start:start + step], tta, batch_size) for start in range(0, max(len(x), 1), step)]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def _chunk_logits(model, x: np.ndarray, tta: str, batch_size: int) -> np.ndarray:
    total = 0.0
    for weight, mirrored, shift in VIEWS[tta]:
        images = np.ascontiguousarray(view(x, mirrored, shift), dtype=np.float32)
        total = total + weight * model.predict(images, batch_size=batch_size, verbose=0)
    return total


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def probabilities(model, x: np.ndarray, tta: str = "none") -> np.ndarray:
    """Class probabilities (float64 softmax of the logits averaged over `tta`'s views): what `imgclf predict` and
    the served model (serving.py) both report, so they answer alike."""
    return softmax(np.asarray(predict_logits(model, x, tta), dtype=np.float64))


def ranked(p: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable (class, probability) of one image's probabilities, most probable first (ties: class order)."""
    return [(classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]]
