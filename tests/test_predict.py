"""`imgclf predict` (imgclf.predict): any image file, converted like the folder source, at the net's size."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from fakes import save_image
from imgclf.serving import predict
from imgclf.files import modelfile
from imgclf.errors import ImgclfError
from imgclf.tta import softmax


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
    probs = softmax(logits.astype(np.float64))
    assert [r[1] for r in rows] == [["cat", "dog", "owl"][i] for i in probs.argmax(1)]
    assert [r[2] for r in rows] == pytest.approx(probs.max(1).tolist())


def test_a_missing_model_is_one_line(tmp_path):
    with pytest.raises(ImgclfError, match="no model there; run `make run`"):
        predict.load_local_model(tmp_path / "nope.keras")


def test_softmax_is_stable():
    probs = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
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


def test_folders_and_globs_stream_to_a_csv_with_the_top_k_and_a_row_per_bad_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    model = saved_model(tmp_path / "m.keras", size=16)
    good = [save_image(tmp_path / "pics/a.png"), save_image(tmp_path / "pics/deeper/b.jpg"),
            save_image(tmp_path / "other/c.png")]
    (tmp_path / "pics/broken.png").write_bytes(b"not a png")
    (tmp_path / "pics/.hidden.png").write_bytes(b"skipped")  # dotfiles are left out, as the folder source does
    monkeypatch.setattr(predict, "BATCH", 2)  # several batches, one of them holding the broken image
    with pytest.raises(ImgclfError) as err:
        predict.main(["pics", "other/*.png", "gone.png"], model_path="m.keras", output="out/preds.csv", top_k=2)
    assert str(err.value).startswith("2 of 5 images could not be predicted (first: pics/broken.png: ")
    assert str(err.value).endswith("; their rows in out/preds.csv say why; the others were predicted")
    import csv

    rows = list(csv.DictReader((tmp_path / "out/preds.csv").open()))
    assert [r["path"] for r in rows] == ["pics/a.png", "pics/broken.png", "pics/deeper/b.jpg", "other/c.png",
                                         "gone.png"]
    assert list(rows[0]) == ["path", "class", "probability", "top1_class", "top1_probability", "top2_class",
                             "top2_probability", "error"]
    from imgclf.data.images import load_image
    from imgclf.tta import predict_logits

    probs = softmax(predict_logits(model, np.stack([load_image(p, 16) for p in good])).astype(np.float64))
    for row, p in zip([rows[0], rows[2], rows[3]], probs):
        order = np.argsort(-p)
        assert (row["class"], row["top2_class"]) == (["cat", "dog", "owl"][order[0]], ["cat", "dog", "owl"][order[1]])
        assert float(row["probability"]) == pytest.approx(p[order[0]], abs=1e-6) and row["error"] == ""
        assert row["top1_class"] == row["class"] and row["top1_probability"] == row["probability"]
    assert rows[1]["class"] == "" and "unreadable or truncated image" in rows[1]["error"]
    assert rows[4]["error"].startswith("gone.png: ")


def test_without_output_each_image_is_a_line_and_a_bad_one_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "owl"]}))
    saved_model(tmp_path / "m.keras", size=8)
    save_image(tmp_path / "a.png")
    with pytest.raises(ImgclfError, match="^1 of 2 images could not be predicted .*see their lines above"):
        predict.main(["a.png", "nope.png"], model_path="m.keras", top_k=3)
    first, second = capsys.readouterr().out.splitlines()
    path, name, prob, top = first.split("\t")
    assert (path, top.split(",")[0]) == ("a.png", f"{name}:{prob}") and len(top.split(",")) == 3
    assert second.startswith("nope.png\terror\tnope.png: ")
