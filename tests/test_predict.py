"""`imgclf predict` (imgclf.predict): any image file, converted like the folder source, at the net's size."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from fakes import save_image
from imgclf import predict
from imgclf.files import modelfile
from imgclf.errors import ImgclfError


def saved_model(path, size: int):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inputs)))
    modelfile.save(model, path)
    return model


@pytest.mark.parametrize("tta", ["none", "flip_translate"])
def test_predict_prints_class_and_probability_at_the_nets_size(tmp_path, monkeypatch, capsys, tta):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    model = saved_model(tmp_path / "m.keras", size=24)
    images = [save_image(tmp_path / "a.png", size=(64, 48)), save_image(tmp_path / "b.jpg", mode="L")]
    rows = predict.main([str(p) for p in images], model_path=str(tmp_path / "m.keras"), tta=tta)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    from imgclf.data.images import load_image
    from imgclf.tta import predict_logits

    logits = predict_logits(model, np.stack([load_image(p, 24) for p in images]), tta)
    probs = predict.softmax(logits.astype(np.float64))
    assert [r[1] for r in rows] == [["cat", "dog", "owl"][i] for i in probs.argmax(1)]
    assert [r[2] for r in rows] == pytest.approx(probs.max(1).tolist())


def test_a_missing_model_is_one_line(tmp_path):
    with pytest.raises(ImgclfError, match="no model there; run `make run`"):
        predict.load_local_model(tmp_path / "nope.keras")


def test_softmax_is_stable():
    probs = predict.softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])


def test_a_corrupt_model_is_one_line_naming_it_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    path = tmp_path / "m.keras"
    saved_model(path, size=8)
    data = path.read_bytes()
    path.write_bytes(data[:50] + bytes(b ^ 0xFF for b in data[50:60]) + data[60:])  # config.json's CRC fails
    with pytest.raises(ImgclfError,
                       match=f"{path}: corrupt Keras model file \\(BadZipFile: .*rerun the train stage"):
        predict.main([str(save_image(tmp_path / "a.png"))], model_path=str(path))
