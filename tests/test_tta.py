"""Test-time augmentation (imgclf.tta): views, weights, and a flip-symmetric image scoring as without TTA."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from imgclf import tta


class Recorder:
    """A stand-in model: records the views it is asked about, returns their mean pixel per 'class'."""

    def __init__(self):
        self.seen = []

    def predict(self, x, batch_size, verbose):
        self.seen.append(x.copy())
        return np.stack([x.mean(axis=(1, 2, 3)), x[:, 0, 0, 0]], axis=1)


def test_views_are_airbenchs_six_with_their_weights():
    assert sum(w for w, _, _ in tta.VIEWS["flip_translate"]) == pytest.approx(1.0)
    x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    np.testing.assert_array_equal(tta.view(x, False, 1), padded[:, 0:4, 0:4])  # airbench's padded[0:32]
    np.testing.assert_array_equal(tta.view(x, False, -1), padded[:, 2:6, 2:6])  # and padded[2:34]
    np.testing.assert_array_equal(tta.view(x, True, -1), padded[:, 2:6, 2:6][:, :, ::-1])
    model = Recorder()
    logits = tta.predict_logits(model, x, "flip_translate")
    assert len(model.seen) == 6 and all(v.dtype == np.float32 for v in model.seen)
    expected = sum(w * Recorder().predict(tta.view(x, m, s).astype(np.float32), 1, 0)
                   for w, m, s in tta.VIEWS["flip_translate"])
    np.testing.assert_allclose(logits, expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["flip", "flip_translate"])
def test_a_flip_symmetric_image_scores_as_without_tta(mode):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    half = np.random.default_rng(0).integers(0, 256, (5, 6, 3, 3), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)  # left-right mirror images of themselves
    constant = np.full((5, 6, 6, 3), 77, np.uint8)  # and shifts with reflect padding change nothing either
    cases = [symmetric] if mode == "flip" else [constant]
    for images in cases:
        np.testing.assert_allclose(tta.predict_logits(model, images, mode), tta.predict_logits(model, images, "none"),
                                   rtol=1e-5, atol=1e-5)


def test_none_is_one_plain_prediction():
    model = Recorder()
    x = np.zeros((3, 4, 4, 1), np.uint8)
    out = tta.predict_logits(model, x, "none")
    assert len(model.seen) == 1 and np.array_equal(out, Recorder().predict(x.astype(np.float32), 1, 0))


@pytest.mark.parametrize("mode", ["none", "flip_translate"])
def test_a_split_goes_through_in_chunks_of_whole_batches_with_the_logits_of_one_pass(monkeypatch, mode):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    x = np.random.default_rng(4).integers(0, 256, (45, 6, 6, 3), dtype=np.uint8)
    one_pass = tta.predict_logits(model, x, mode, batch_size=4)
    calls = []
    real_predict = model.predict
    monkeypatch.setattr(model, "predict", lambda images, **kw: calls.append(len(images)) or real_predict(images, **kw))
    monkeypatch.setattr(tta, "CHUNK_BYTES", 3 * 4 * 6 * 6 * 3 * 4)  # three batches of 4 float32 images
    chunked = tta.predict_logits(model, x, mode, batch_size=4)
    assert np.array_equal(chunked, one_pass)  # bit for bit: every batch is the one a single pass sees
    assert calls == [n for n in (12, 12, 12, 9) for _ in tta.VIEWS[mode]]  # chunk by chunk, every view of each
    assert chunked.shape == (45, 3)
