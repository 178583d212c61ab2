"""models/model.keras (imgclf.modelfile): the same bytes for the same model at any time, loaded safely."""

from __future__ import annotations

import json
import time
import zipfile

import keras
import numpy as np

from imgclf.modelfile import ZIP_EPOCH, load, save


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


def test_two_saves_a_second_apart_are_byte_identical_and_load(tmp_path):
    model = tiny_model()
    save(model, tmp_path / "a.keras")
    time.sleep(1.1)  # Keras stamps the second into the file
    save(model, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.keras") as z:
        assert [i.filename for i in z.infolist()] == sorted(i.filename for i in z.infolist())
        assert {i.date_time for i in z.infolist()} == {ZIP_EPOCH}
        assert "date_saved" not in json.loads(z.read("metadata.json"))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(load(tmp_path / "a.keras")(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras", "b.keras"]  # no temp file left


def test_other_weights_give_other_bytes(tmp_path):
    model = tiny_model()
    save(model, tmp_path / "a.keras")
    model.set_weights([w + 1 for w in model.get_weights()])
    save(model, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() != (tmp_path / "b.keras").read_bytes()
