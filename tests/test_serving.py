"""The served model (imgclf.serving): class names and probabilities as `imgclf predict` gives them, over a real
`mlflow models serve` and through `mlflow.pyfunc.load_model`; a bad request is one short HTTP 400."""

from __future__ import annotations

import base64
import contextlib
import csv
import os
import signal
import subprocess

import keras
import mlflow
import numpy as np
import pytest
import requests

from conftest import BIN, free_port, pipeline_env, run, store_in, wait_until
from fakes import save_image
from imgclf.serving import predict
from imgclf.data.images import load_image
from imgclf.serving.pyfunc import BadRequest, answers, to_images


def test_a_bad_request_is_one_line_saying_what_was_expected():
    cases = [
        (np.zeros((8, 8, 3)), "one image of shape (8, 8, 3) without the batch axis; send a batch of shape "
                              "(N, 8, 8, 3), RGB pixels 0-255: [[...]]"),
        (np.full((1, 8, 8, 3), 0.5), "pixels from 0.5 to 0.5 look scaled to [0, 1]; send 0-255 values (multiply by 255)"),
        (np.zeros((1, 8, 8, 1)), "shape (1, 8, 8, 1); send a batch of shape (N, 8, 8, 3), RGB pixels 0-255, or "
                                 "base64-encoded images of any size"),
        (np.full((1, 8, 8, 3), 300), "pixels from 300 to 300; send a batch of shape (N, 8, 8, 3), RGB pixels 0-255"),
        (np.array(["%%%"]), "image 0: not base64; send encoded images (PNG, JPEG, ...) as base64 strings"),
        (np.array([base64.b64encode(b"text").decode()]), "image 0: unreadable or truncated image (unknown image "
                                                         "format); send a PNG, JPEG, BMP or GIF file's bytes"),
    ]
    for request, line in cases:
        with pytest.raises(BadRequest) as err:
            to_images(request, 8)
        assert err.value.message == line and err.value.get_http_status_code() == 400
        err.value.message = f"Failed to predict data '{request}'"  # what the scoring server does: ignored
        assert err.value.message == line
    assert to_images(np.full((2, 8, 8, 3), 255, np.uint8), 8).shape == (2, 8, 8, 3)


def test_an_answer_names_the_class_its_probability_and_the_top_k():
    (row,) = answers(np.array([[0.1, 0.7, 0.2]]), ["cat", "dog", "owl"], 2)
    assert row == {"class": "dog", "probability": 0.7,
                   "top_k": [{"class": "dog", "probability": 0.7}, {"class": "owl", "probability": 0.2}]}


@pytest.mark.parametrize("tta", ["none", "flip_translate"])
def test_the_logged_pyfunc_answers_as_imgclf_predict_does(tmp_path, monkeypatch, empty_store, tta, capfd):
    from imgclf.serving.pyfunc import log_served_model

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(store_in(tmp_path, empty_store))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))))
    with mlflow.start_run() as active:
        log_served_model(model, ["cat", "dog", "owl"], tta, None)
    logged = capfd.readouterr()
    assert "Add type hints" not in logged.err + logged.out and "Validating input example" not in logged.err + logged.out
    images = [save_image(tmp_path / "a.png", size=(30, 20)), save_image(tmp_path / "b.png")]
    served = mlflow.pyfunc.load_model(f"runs:/{active.info.run_id}/model")
    pixels = served.predict(np.stack([load_image(p, 12) for p in images]))
    encoded = served.predict(np.array([base64.b64encode(p.read_bytes()).decode() for p in images]))
    monkeypatch.setattr(predict, "load_run_model", lambda run_id: (served.unwrap_python_model().model,
                                                                    ["cat", "dog", "owl"]))
    rows = predict.main([str(p) for p in images], run_id="x", tta=tta, top_k=3)
    for answer in (pixels, encoded):
        assert answer["class"].tolist() == [r.cls for r in rows]
        np.testing.assert_allclose(answer["probability"], [r.probability for r in rows], rtol=0, atol=1e-6)
        assert [[t["class"] for t in top] for top in answer["top_k"]] == [[c for c, _ in r.top] for r in rows]


@contextlib.contextmanager
def model_server(repo, model_uri: str):
    """`mlflow models serve` of `model_uri` on 127.0.0.1, from the repo's own store; its /invocations URL."""
    port = free_port()
    env = pipeline_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    with open(repo / "serve.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port)], cwd=repo, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow models serve exited: {(repo / 'serve.log').read_text()[-3000:]}")
                with contextlib.suppress(requests.RequestException):
                    return requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok
                return False

            wait_until(up, 120, f"mlflow models serve on port {port}", interval=0.5)
            yield f"http://127.0.0.1:{port}/invocations"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.e2e
@pytest.mark.long(45)
def test_the_champion_over_http_answers_as_imgclf_predict_and_refuses_bad_requests_in_one_line(trained,
                                                                                                trained_copy):
    repo = trained_copy
    images = [save_image(repo / "a.png", size=(48, 40)), save_image(repo / "b.png")]
    run(["imgclf", "predict", "--run", trained.run_id, "-o", "preds.csv", "-k", "3", *map(str, images)], repo)
    expected = list(csv.DictReader((repo / "preds.csv").open()))
    run(["imgclf", "promote", trained.run_id], repo)
    with model_server(repo, "models:/imgclf@champion") as url:
        tensors = requests.post(url, json={"inputs": np.stack([load_image(p, 32) for p in images]).tolist()})
        encoded = requests.post(url, json={"inputs": [base64.b64encode(p.read_bytes()).decode() for p in images]})
        for response in (tensors, encoded):
            assert response.status_code == 200, response.text
            answers_ = response.json()["predictions"]
            assert [a["class"] for a in answers_] == [row["class"] for row in expected]
            assert [a["probability"] for a in answers_] == pytest.approx([float(r["probability"]) for r in expected],
                                                                          abs=1e-6)
            assert [a["top_k"][2]["class"] for a in answers_] == [row["top3_class"] for row in expected]
        bad = requests.post(url, json={"inputs": load_image(images[0], 32).tolist()})
        assert bad.status_code == 400 and bad.json()["message"] == (
            "one image of shape (32, 32, 3) without the batch axis; send a batch of shape (N, 32, 32, 3), RGB pixels "
            "0-255: [[...]]")
        scaled = requests.post(url, json={"inputs": (load_image(images[0], 32)[None] / 255.0).tolist()})
        assert scaled.status_code == 400 and "look scaled to [0, 1]" in scaled.json()["message"]
    log = (repo / "serve.log").read_text()
    assert "step/step" not in log and "━" not in log  # no Keras progress bar per request
