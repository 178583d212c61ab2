"""models/model.keras (imgclf.files.modelfile): the same bytes for the same model at any time, loaded safely."""

from __future__ import annotations

import json
import random
import time
import zipfile

import keras
import numpy as np
import pytest

from fakes import damage_weights
from imgclf.errors import ImgclfError
from imgclf.files.modelfile import ZIP_EPOCH, check_round_trip, load, save


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


def _flip_bytes(data: bytes) -> bytes:
    middle = len(data) // 3
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 200]) + data[middle + 200:]


def _garbage_weights(path):
    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in members:
            dst.writestr(info, b"x" * len(data) if info.filename.endswith(".h5") else data)


@pytest.mark.parametrize("damage, culprit", [
    pytest.param(lambda p: p.write_bytes(_flip_bytes(p.read_bytes())), "BadZipFile", id="bad-crc"),
    pytest.param(_garbage_weights, "OSError", id="weights-not-h5"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:300]), "not a .keras zip archive", id="truncated"),
])
def test_a_corrupt_model_file_is_one_line_naming_it_and_the_fix(tmp_path, damage, culprit):
    path = save(tiny_model(), tmp_path / "model.keras")
    damage(path)
    with pytest.raises(ImgclfError, match=f"{path}: .*{culprit}.*rerun the train stage") as err:
        load(path)
    assert "\n" not in str(err.value)


class Doubler(keras.layers.Layer):  # not registered with Keras: saves, but never loads back
    def call(self, x):
        return 2 * x


def test_the_round_trip_check_passes_a_plain_model_and_changes_no_random_state():
    model = tiny_model()
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    check_round_trip(model)  # builds a copy, whose initializers draw seeds from Python's random
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state)


@pytest.mark.parametrize("layer, culprit", [
    pytest.param(lambda: Doubler(name="twice"),
                 "layer 'twice' \\(Doubler\\).*TypeError: Could not locate class 'Doubler'", id="unregistered"),
    pytest.param(lambda: keras.layers.Lambda(lambda x: 2 * x, name="anon"),
                 "layer 'anon' \\(Lambda\\).*ValueError", id="lambda-in-safe-mode"),
])
def test_the_round_trip_check_names_the_layer_that_would_not_load(layer, culprit):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layer()(keras.layers.Dense(3)(inputs)), name="mine")
    with pytest.raises(ImgclfError, match=f"model 'mine': {culprit}.*register_keras_serializable") as err:
        check_round_trip(model)
    assert "\n" not in str(err.value)


def test_build_compiled_runs_the_round_trip_check_right_after_build(monkeypatch):
    from imgclf import train
    from imgclf.training import families
    from imgclf.training.distribute import make_strategy

    def build(params, num_classes, x_train):
        inputs = keras.Input(x_train.shape[1:])
        return keras.Model(inputs, Doubler(name="twice")(keras.layers.Dense(num_classes)(inputs)), name="mine")

    family = families.Family(params={}, build=build, compile=lambda model, params, steps: model.compile("sgd"))
    monkeypatch.setattr(families.REGISTRY, "get", lambda name: family)
    params = {"model": {"arch": "mine"}, "train": {"mixed_precision": "none", "batch_size": 4}}
    with pytest.raises(ImgclfError, match="model 'mine': layer 'twice' \\(Doubler\\)"):
        train.build_compiled(params, 3, make_strategy("none"), np.zeros((8, 4), np.float32))


def test_a_model_whose_weights_changed_on_disk_is_refused_in_one_line(tmp_path):
    from imgclf.files.modelfile import weights_sha256

    model = tiny_model()
    save(model, tmp_path / "m.keras")
    expected = weights_sha256(model)
    assert weights_sha256(load(tmp_path / "m.keras", expected)) == expected
    damage_weights(tmp_path / "m.keras")
    assert weights_sha256(load(tmp_path / "m.keras")) != expected  # it still loads: only the hash tells
    with pytest.raises(ImgclfError) as err:
        load(tmp_path / "m.keras", expected, "reports/train.json")
    assert str(err.value) == (
        f"{tmp_path / 'm.keras'}: its weights (sha256 {weights_sha256(load(tmp_path / 'm.keras'))[:12]}) are not the "
        f"ones training recorded in reports/train.json ({expected[:12]}): the file is damaged or from another run; "
        "rerun the train stage (`dvc repro`) to write it again, or pass a model saved by imgclf")
