"""Large images end to end, in process with tiny settings: a folder of photos decoded by two workers, the
fast family trained at 96, 128 and 224 px from the memory-mapped arrays, evaluated with TTA, and a photo
predicted (the real prepare, train, evaluate and predict code; a real MLflow store; real TensorFlow)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import REPO, store_in
from fakes import make_folder, save_image
from imgclf import evaluate, prepare, train
from imgclf.serving import predict
from imgclf.config import load_params
from imgclf.data.images import load_image
from imgclf.files.modelfile import load as load_model
from imgclf.files.prepared_reader import load_prepared
from imgclf.tta import predict_logits, softmax

pytestmark = pytest.mark.e2e


def large_params(images, size: int) -> dict:
    """The fast family on data.image_size px photos, small enough to train in seconds."""
    sets = {"data.dataset": "folder", "data.path": str(images), "data.image_size": size, "data.workers": 2,
            "data.dev_fraction": 0.25, "model.arch": "fast", "model.fast.widths": "[4, 8, 8]",
            "model.fast.whiten_images": 12, "train.batch_size": 4, "train.training_epochs": 1,
            "train.early_stopping.monitor": "none", "evaluate.tta": "flip_translate"}
    return load_params(REPO / "params.yaml", [f"{key}={value}" for key, value in sets.items()])


@pytest.mark.parametrize("size", [96, 128, 224])
def test_the_fast_family_trains_evaluates_and_predicts_large_images_from_a_folder(tmp_path, monkeypatch,
                                                                                  empty_store, size):
    monkeypatch.chdir(tmp_path)
    store_in(tmp_path, empty_store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    images = make_folder(tmp_path / "images", classes=("cat", "dog"), n_train=8, size=(size + 21, size - 7))
    params = large_params(images, size)
    manifest = prepare.prepare(params)  # into data/prepared etc. under tmp_path: predict reads the class names there
    assert manifest["image_shape"] == [size, size, 3] and manifest["splits"]["dev"]["count"] == 4
    splits, _ = load_prepared()
    assert isinstance(splits["train"][0], np.memmap) and splits["train"][0].shape == (12, size, size, 3)
    summary = train.train(params)
    assert summary["epochs_run"] == 1 and summary["mlflow_run_id"]
    history = (tmp_path / "reports/history.csv").read_text().splitlines()
    assert len(history) == 2 and "nan" not in history[1]  # one epoch, with its dev metrics
    metrics = evaluate.evaluate(params)
    assert metrics["dev"]["count"] == 4
    model = load_model(str(tmp_path / "models/model.keras"))
    assert model.input_shape == (None, size, size, 3)
    photo = save_image(tmp_path / "photo.png", size=(size + 50, size + 30))
    predict.main([str(photo)], tta="flip_translate", output="photo.csv")  # rows are streamed, not returned
    ((_, name, prob, *_),) = list(csv.reader(open("photo.csv")))[1:]
    prob = float(prob)
    probs = softmax(predict_logits(model, load_image(photo, size)[None], "flip_translate").astype(np.float64))
    assert name == ["cat", "dog"][int(probs.argmax())] and prob == pytest.approx(probs.max(), abs=1e-6)
    rows = (tmp_path / "reports/dev_predictions.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 5
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["dev"]["count"] == 4
