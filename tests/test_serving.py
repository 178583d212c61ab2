"""The served model (imgclf.serving): class names and probabilities as `imgclf predict` gives them, over a real
`mlflow models serve` and through `mlflow.pyfunc.load_model`; a bad request is one short HTTP 400, in every JSON
form, under the input policy (data/policy.py); the model checks its weights and class names when it loads."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from conftest import BIN, REPO, free_port, pipeline_env, run, store_in, wait_until
from fakes import save_image
from imgclf.data.images import load_image
from imgclf.data.policy import RequestLimits
from imgclf.errors import ImgclfError
from imgclf.files.modelfile import weights_sha256
from imgclf.serving import predict
from imgclf.serving.pyfunc import answers
from imgclf.serving.request import BadRequest, to_images

CLASSES = ["cat", "dog", "owl"]


def refusal(request, size: int = 8, limits: RequestLimits = RequestLimits()) -> str:
    """The one line to_images refuses `request` with (it must refuse it as a BadRequest, an HTTP 400)."""
    with pytest.raises(BadRequest) as err:
        to_images(request, size, limits)
    assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message
    err.value.message = f"Failed to predict data '{request}'"  # what the scoring server does: ignored
    return err.value.message


def test_a_bad_request_is_one_line_saying_what_was_expected():
    cases = [
        (np.zeros((8, 8, 3)), "one image of shape (8, 8, 3) without the batch axis; send a batch of shape "
                              "(N, 8, 8, 3), RGB pixels 0-255: [[...]]"),
        (np.full((1, 8, 8, 3), 0.5), "pixels from 0.5 to 0.5 look scaled to [0, 1]; send 0-255 values (multiply by 255 "
                                     "and round)"),
        (np.zeros((1, 8, 8, 1)), "shape (1, 8, 8, 1); send a batch of shape (N, 8, 8, 3), RGB pixels 0-255, or "
                                 "base64-encoded images (PNG, JPEG, BMP, GIF) of any size"),
        (np.full((1, 8, 8, 3), 300), "pixels from 300 to 300, outside 0-255; send a batch of shape (N, 8, 8, 3), RGB "
                                     "pixels 0-255"),
        (np.array(["%%%"]), "image 0: not base64; send base64-encoded images (PNG, JPEG, BMP, GIF) as base64 strings"),
        (np.array([base64.b64encode(b"text").decode()]), "image 0: unreadable or truncated image (unknown image "
                                                         "format: not PNG, JPEG, BMP or GIF); send base64-encoded "
                                                         "images (PNG, JPEG, BMP, GIF)"),
    ]
    for request, line in cases:
        assert refusal(request) == line
    assert to_images(np.full((2, 8, 8, 3), 255, np.uint8), 8).shape == (2, 8, 8, 3)


def test_nan_and_infinite_pixels_are_refused_and_so_are_fractions_but_a_black_float_image_is_taken():
    nan = np.full((1, 8, 8, 3), np.nan)
    mixed = np.full((2, 8, 8, 3), 255.0)
    mixed[1, 3, 3, 1] = np.nan  # NaN compares false both ways: a range check alone lets it through
    for request in (nan, mixed, np.full((1, 8, 8, 3), np.inf), np.full((1, 8, 8, 3), -np.inf)):
        assert refusal(request).startswith("NaN or infinite values; send a batch of shape (N, 8, 8, 3)")
    assert refusal(np.full((1, 8, 8, 3), 127.5)) == ("pixels that are not whole numbers (such as 127.5); send a "
                                                     "batch of shape (N, 8, 8, 3), RGB pixels 0-255")
    black = to_images(np.zeros((1, 8, 8, 3)), 8)  # float zeros: a black image, not "scaled to [0, 1]"
    assert black.dtype == np.uint8 and not black.any()
    np.testing.assert_array_equal(to_images(np.full((1, 8, 8, 3), 254.0), 8), np.full((1, 8, 8, 3), 254, np.uint8))


def test_requests_that_are_not_images_are_one_line_naming_the_culprit_in_every_form_mlflow_hands_over():
    cases = [
        (np.array([None], dtype=object), "image 0 in the request is null; send base64-encoded images"),  # [null]
        (np.array(["x", 3], dtype=object), "image 1 in the request is a number; send"),
        (pd.DataFrame({"image": [1, 2]}), "image 0 in column `image` is a number; send"),  # numeric column
        (pd.DataFrame({"image": [[1, 2], [3]]}), "image 0 in column `image` is a list; send"),  # column of lists
        (pd.DataFrame({"image": [None]}), "image 0 in column `image` is null; send"),
        (pd.DataFrame({"a": ["x"], "b": ["y"]}), "a table with columns ['a', 'b']: send one column `image`"),
        ({"pixels": np.zeros(3)}, "named inputs ['pixels']; send `inputs` as a list of images"),
        ({"image": np.array([{"a": 1}], dtype=object)}, "image 0 in the request is an object; send"),
        (np.array([[1, None], [2, 3]], dtype=object), "a 2-D array holding null among numbers; send a batch"),
        (np.array([[[[10**30] * 3] * 8] * 8], dtype=object), "pixels from 1e+30 to 1e+30, outside 0-255; send"),
        (np.array("abc"), "one value; send a list of base64-encoded images"),
        (np.array([True]), "bool values; send a batch of shape (N, 8, 8, 3)"),
    ]
    for request, start in cases:
        assert refusal(request).startswith(start), (request, refusal(request))


def png_bytes(size: tuple[int, int], mode: str = "L", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_work_of_one_request_is_bounded_before_any_image_is_decoded():
    small = base64.b64encode(png_bytes((8, 8))).decode()
    limits = RequestLimits(max_images=2, max_request_bytes=1000, max_request_pixels=200)
    assert refusal(np.array([small] * 3, dtype=object), limits=limits) == (
        "3 images, more than the 2 a request may hold; send them in several requests")
    assert refusal(np.zeros((3, 8, 8, 3), np.uint8), limits=limits).startswith("3 images, more than the 2")
    assert refusal(np.array(["A" * 1004], dtype=object), limits=limits) == (
        "1,004 bytes of encoded images, more than the 1,000 a request may hold; send fewer or smaller images per "
        "request")
    assert refusal(np.array([small] * 2, dtype=object), limits=RequestLimits(max_request_pixels=100)) == (
        "images 0-1 declare 128 pixels, more than the 100 a request may hold; send fewer or smaller images per request")
    # 35 Mpx in a few KB: within the 40 Mpx an image may have, beyond what a request may decode (the default limits)
    bomb = png_bytes((7000, 5000))
    assert len(bomb) < 64_000
    assert refusal(np.array([base64.b64encode(bomb).decode()], dtype=object)) == (
        "images 0-0 declare 35,000,000 pixels, more than the 24,000,000 a request may hold; send fewer or smaller "
        "images per request")


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_only_the_formats_prepare_reads_are_opened_whatever_the_name(tmp_path, fmt):
    data = png_bytes((16, 16), "RGB", fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    assert refusal(np.array([base64.b64encode(data).decode()], dtype=object)).startswith(
        "image 0: unreadable or truncated image (unknown image format: not PNG, JPEG, BMP or GIF)")
    (tmp_path / "x.png").write_bytes(data)
    from imgclf.errors import DataError

    with pytest.raises(DataError, match="x.png: unreadable or truncated image \\(unknown image format: not PNG"):
        load_image(tmp_path / "x.png")


def test_an_answer_names_the_class_its_probability_and_the_top_k():
    (row,) = answers(np.array([[0.1, 0.7, 0.2]]), ["cat", "dog", "owl"], 2)
    assert row == {"class": "dog", "probability": 0.7,
                   "top_k": [{"class": "dog", "probability": 0.7}, {"class": "owl", "probability": 0.2}]}


def tiny_net(size: int = 12, outputs: int = 3, seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(outputs)(flat))


@contextlib.contextmanager
def tracking_uri(uri: str):
    """MLflow pointed at `uri` in this process for a while (a session fixture runs outside undo_process_changes)."""
    saved_env, saved = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        os.environ.pop("MLFLOW_TRACKING_URI", None) if saved_env is None else os.environ.update(
            MLFLOW_TRACKING_URI=saved_env)


def log_tiny_model(folder: Path, empty_store: Path, tta: str) -> tuple[str, str]:
    """tiny_net logged as train logs a model, in a store of its own at folder/mlflow.db: (store URI, run id)."""
    from imgclf.serving.pyfunc import log_served_model

    uri = store_in(folder, empty_store)
    with tracking_uri(uri), mlflow.start_run() as active:
        log_served_model(tiny_net(), CLASSES, tta, None)
    return uri, active.info.run_id


def test_the_logged_pyfunc_answers_as_imgclf_predict_does_with_the_runs_tta(tmp_path, monkeypatch, empty_store, capfd):
    """The real loader, no stub: predict --run takes the TTA logged with the model, whatever it is told locally."""
    monkeypatch.chdir(tmp_path)
    uri, run_id = log_tiny_model(tmp_path, empty_store, "flip_translate")
    logged = capfd.readouterr()
    assert "Add type hints" not in logged.err + logged.out and "Validating input example" not in logged.err + logged.out
    mlflow.set_tracking_uri(uri)
    images = [save_image(tmp_path / "a.png", size=(30, 20)), save_image(tmp_path / "b.png")]
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    pixels = served.predict(np.stack([load_image(p, 12) for p in images]))
    encoded = served.predict(np.array([base64.b64encode(p.read_bytes()).decode() for p in images]))
    untransformed = served.unwrap_python_model().model.predict(np.stack([load_image(p, 12) for p in images]),
                                                               verbose=0)
    assert not np.allclose(encoded["probability"], np.exp(untransformed).max(1) / np.exp(untransformed).sum(1))
    predict.main([str(p) for p in images], run_id=run_id, output="preds.csv", top_k=3)
    rows = list(csv.DictReader(open("preds.csv")))
    for answer in (pixels, encoded):
        assert answer["class"].tolist() == [r["class"] for r in rows]
        np.testing.assert_allclose(answer["probability"], [float(r["probability"]) for r in rows], rtol=0, atol=1e-6)
        assert [[t["class"] for t in top] for top in answer["top_k"]] == [
            [r[f"top{i}_class"] for i in (1, 2, 3)] for r in rows]


def refused_at_load(local: Path, **model_config) -> str:
    """The one line mlflow.pyfunc.load_model of the model at `local` is refused with (it must be refused)."""
    with pytest.raises(ImgclfError) as err:
        mlflow.pyfunc.load_model(str(local), model_config=model_config or None)
    assert "\n" not in str(err.value)
    return str(err.value)


def as_logged_before_weights_json(local: Path) -> None:
    """Rewrite the model at `local` as log_served_model logged it before weights.json: the sha256 in model_config."""
    import yaml

    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    del flavor["artifacts"]["weights"]
    flavor["config"]["weights_sha256"] = json.loads((local / "artifacts/weights.json").read_text())["weights_sha256"]
    (local / "artifacts/weights.json").unlink()
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def test_the_served_model_checks_its_weights_and_its_class_names_when_it_loads(tmp_path, empty_store):
    from imgclf.files.modelfile import save

    uri, run_id = log_tiny_model(tmp_path, empty_store, "none")
    sha = weights_sha256(tiny_net())
    with tracking_uri(uri):
        params = mlflow.tracking.MlflowClient().get_run(run_id).data.params
        assert params["tta"] == "none" and "weights_sha256" not in params  # a result, not a setting
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "dl")))
        logged = mlflow.pyfunc.load_model(str(local))  # as logged: loads, its limits and weights' hash recorded
        assert logged.model_config == {"tta": "none", "top_k": 3, **RequestLimits().as_config()}
        assert json.loads((local / "artifacts/weights.json").read_text()) == {"weights_sha256": sha}
        limited = mlflow.pyfunc.load_model(str(local), model_config={"max_images": 1})  # what a person changes
        with pytest.raises(BadRequest, match="^2 images, more than the 1 a request may hold"):
            limited.predict(np.zeros((2, 12, 12, 3), np.uint8))
        net, intact = local / "artifacts/model.keras", (local / "artifacts/model.keras").read_bytes()
        save(tiny_net(seed=1), net)  # another run's net of the same shape
        swapped = weights_sha256(tiny_net(seed=1))
        refusal = (rf"^{re.escape(str(net))}: its weights \(sha256 {swapped[:12]}\) are not the ones training "
                   rf"recorded in the logged weights.json \({sha[:12]}\): the file is damaged or from another run")
        assert re.match(refusal, refused_at_load(local))
        assert re.match(refusal, refused_at_load(local, weights_sha256=swapped))  # no override of the record
        # The record is weights.json's: naming the swapped net's hash there (and only there) lets it load.
        (local / "artifacts/weights.json").write_text(json.dumps({"weights_sha256": swapped}))
        assert mlflow.pyfunc.load_model(str(local))
        for damaged, reason in (("{", "JSONDecodeError: Expecting property name"), ("[]", "TypeError: list"),
                                ('{"weights_sha256": 7}', "weights_sha256 is 7")):
            (local / "artifacts/weights.json").write_text(damaged)
            assert refused_at_load(local).startswith(
                f"{local / 'artifacts/weights.json'}: not the {{\"weights_sha256\": \"<64 hex digits>\"}} training "
                f"logs ({reason}")
        (local / "artifacts/weights.json").write_text(json.dumps({"weights_sha256": sha}))
        net.write_bytes(intact)
        names = local / "artifacts" / "classes.json"
        for wrong in (CLASSES + ["emu"], CLASSES[:2]):
            names.write_text(json.dumps(wrong))
            assert refused_at_load(local).endswith(
                f"model.keras: the net has 3 outputs but the logged classes.json names {len(wrong)} classes: they are "
                "from different runs; predict with the model and class names of one run (--run RUN_ID, or retrain)")
        names.write_text(json.dumps(CLASSES))


def test_a_model_logged_with_its_weights_sha256_in_model_config_still_loads_and_is_checked(tmp_path, empty_store):
    from imgclf.files.modelfile import save

    uri, run_id = log_tiny_model(tmp_path, empty_store, "none")
    with tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "dl")))
    as_logged_before_weights_json(local)
    old = mlflow.pyfunc.load_model(str(local))
    assert old.model_config["weights_sha256"] == weights_sha256(tiny_net())
    assert old.predict(np.zeros((1, 12, 12, 3), np.uint8))["class"].tolist()[0] in CLASSES
    refusal = r"model.keras: its weights \(sha256 {}\) are not the ones training recorded in the logged model's " \
              r"model_config \({}\): the file is damaged or from another run"
    sha, swapped = weights_sha256(tiny_net()), weights_sha256(tiny_net(seed=1))
    assert re.search(refusal.format(sha[:12], "000000000000"), refused_at_load(local, weights_sha256="0" * 64))
    save(tiny_net(seed=1), local / "artifacts/model.keras")  # another run's net of the same shape
    assert re.search(refusal.format(swapped[:12], sha[:12]), refused_at_load(local))


@pytest.mark.e2e
@pytest.mark.xdist_group("serving")
def test_a_trained_run_keeps_its_weights_sha256_as_a_tag_and_beside_its_model_not_as_a_param(trained, tmp_path):
    from imgclf.files.modelfile import load, save

    client = mlflow.tracking.MlflowClient(f"sqlite:///{trained.repo / 'mlflow.db'}")
    logged = client.get_run(trained.run_id).data
    assert "weights_sha256" not in logged.params and {"tta", "top_k", "max_images"} <= set(logged.params)
    sha = json.loads((trained.repo / "reports/train.json").read_text())["weights_sha256"]
    assert logged.tags["weights_sha256"] == sha
    with tracking_uri(f"sqlite:///{trained.repo / 'mlflow.db'}"):
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained.run_id}/model", dst_path=str(tmp_path)))
    assert json.loads((local / "artifacts/weights.json").read_text()) == {"weights_sha256": sha}
    assert mlflow.pyfunc.load_model(str(local)).unwrap_python_model().classes
    net = load(local / "artifacts/model.keras", sha)
    net.layers[-1].kernel.assign(net.layers[-1].kernel + 1e-3)  # a tampered file: the same net, one layer off
    save(net, local / "artifacts/model.keras")
    line = (rf"model.keras: its weights \(sha256 \w{{12}}\) are not the ones training recorded in the logged "
            rf"weights.json \({sha[:12]}\): the file is damaged or from another run")
    assert re.search(line, refused_at_load(local))
    # The server does not start: its log holds that line (after the model's traceback, before MLflow's own).
    served = run([str(BIN / "mlflow"), "models", "serve", "-m", str(local), "--env-manager", "local", "-h",
                  "127.0.0.1", "-p", str(free_port())], tmp_path, check=False, timeout=180)
    assert served.returncode != 0 and re.search(rf"^imgclf.errors.ImgclfError: {re.escape(str(local))}/artifacts/"
                                                + line, served.stderr, re.MULTILINE)


@contextlib.contextmanager
def model_server(repo: Path, model_uri: str, **env: str):
    """`mlflow models serve` of `model_uri` on 127.0.0.1, from the repo's own store; its /invocations URL."""
    port = free_port()
    env = pipeline_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}", **env)
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


@dataclass(frozen=True)
class Served:
    """tiny_net served by a real `mlflow models serve`: its URL, its folder and store, its run, its answers."""

    url: str
    folder: Path
    run_id: str
    images: list  # base64 PNGs of assorted sizes
    expected: list  # the class each of them gets, computed here from the same net under the same TTA

    def good(self, i: int = 0, form: str = "inputs") -> dict:
        return request_body(form, [self.images[i]])


def request_body(form: str, items: list) -> dict:
    """`items` (one per image) in one of the JSON forms MLflow accepts."""
    if form in ("inputs", "instances"):
        return {form: items}
    if form == "dataframe_split":
        return {form: {"columns": ["image"], "data": [[item] for item in items]}}
    return {form: [{"image": item} for item in items]}


FORMS = ("inputs", "instances", "dataframe_split", "dataframe_records")
SERVED_TTA = "flip_translate"


_served: list[Served] = []  # the running server, shared by the fixture's definitions here and in the fuzz module


@pytest.fixture(scope="session")
def served(tmp_path_factory, empty_store):
    """One server for this module's and test_serving_fuzz.py's tests (one xdist_group: one worker starts it).
    test_serving_fuzz imports this fixture, which makes a second definition of it there: both hand out one server."""
    from imgclf.tta import probabilities

    if _served:
        yield _served[0]
        return
    folder = tmp_path_factory.mktemp("served")
    _, run_id = log_tiny_model(folder, empty_store, SERVED_TTA)
    files = [save_image(folder / f"{i}.png", size=(8 + 5 * i, 30 - 3 * i)) for i in range(6)]
    probs = probabilities(tiny_net(), np.stack([load_image(p, 12) for p in files]), SERVED_TTA)
    with model_server(folder, f"runs:/{run_id}/model") as url:
        _served.append(Served(url, folder, run_id, [base64.b64encode(p.read_bytes()).decode() for p in files],
                              [CLASSES[i] for i in probs.argmax(1)]))
        try:
            yield _served[0]
        finally:
            _served.clear()


def check_refusal(response: requests.Response) -> str:
    """A refusal as the issue asks: HTTP 400, a JSON body whose message is one line, no stack trace; its line."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body, body
    assert "\n" not in body["message"], body
    assert "Traceback" not in response.text and len(body["message"]) < 400, body
    return body["message"]


def check_answers(response: requests.Response, served: Served, indices: list[int]) -> None:
    assert response.status_code == 200, response.text
    assert [a["class"] for a in json.loads(response.text)["predictions"]] == [served.expected[i] for i in indices]


HOSTILE = {  # what MLflow used to answer with its generic message and the whole stack trace, and NaN answered 200
    "null": [None],
    "number": [1],
    "list": [[1, 2]],
    "object": [{"a": 1}],
    "string and null": ["x", None],
}


@pytest.mark.e2e
@pytest.mark.xdist_group("serving")
@pytest.mark.parametrize("form", FORMS)
def test_hostile_requests_are_one_line_400s_in_every_json_form_and_the_next_good_one_is_answered(served, form):
    for name, items in HOSTILE.items():
        line = check_refusal(requests.post(served.url, json=request_body(form, items), timeout=60))
        # names the image or the shape at fault (numbers in `inputs` are a tensor), and what to send instead
        culprits = ("image ", "shape (1", "a 2-D array holding", "named inputs")
        assert line.startswith(culprits) and "; send " in line, (name, line)
        check_answers(requests.post(served.url, json=served.good(1, form), timeout=60), served, [1])
    png = served.images[0]
    for items, start in ((["%%%"], "image 0: not base64"), ([png[:40]], "image 0: unreadable or truncated image"),
                         ([png] * 257, "257 images, more than the 256 a request may hold")):
        assert check_refusal(requests.post(served.url, json=request_body(form, items), timeout=60)).startswith(start)
    check_answers(requests.post(served.url, json=request_body(form, served.images), timeout=60), served, list(range(6)))


@pytest.mark.e2e
@pytest.mark.xdist_group("serving")
def test_nan_pixels_are_a_400_and_a_35_megapixel_png_is_refused_from_its_header(served):
    nan = np.full((1, 12, 12, 3), 255.0)
    nan[0, 0, 0, 0] = np.nan
    body = json.dumps({"inputs": nan.tolist()})  # NaN as Python's json writes it, which MLflow's parser takes
    line = check_refusal(requests.post(served.url, data=body, headers={"Content-Type": "application/json"}, timeout=60))
    assert line.startswith("NaN or infinite values; send a batch of shape (N, 12, 12, 3)")
    assert check_refusal(requests.post(served.url, json={"inputs": np.full((1, 12, 12, 3), 127.5).tolist()},
                                       timeout=60)).startswith("pixels that are not whole numbers (such as 127.5)")
    black = requests.post(served.url, json={"inputs": np.zeros((1, 12, 12, 3)).tolist()}, timeout=60)
    assert black.status_code == 200 and json.loads(black.text)["predictions"][0]["class"] in CLASSES
    bomb = base64.b64encode(png_bytes((7000, 5000))).decode()
    line = check_refusal(requests.post(served.url, json={"inputs": [bomb]}, timeout=10))
    assert line.startswith("images 0-0 declare 35,000,000 pixels, more than the 24,000,000 a request may hold")
    check_answers(requests.post(served.url, json=served.good(2), timeout=60), served, [2])


@pytest.mark.e2e
@pytest.mark.xdist_group("serving")
def test_imgclf_predict_run_answers_as_the_server_with_the_runs_tta_not_the_local_one(served, tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())  # evaluate.tta: none here
    assert "tta: none" in (tmp_path / "params.yaml").read_text() and SERVED_TTA != "none"
    files = []
    for i, image in enumerate(served.images):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(base64.b64decode(image))
    env = pipeline_env(MLFLOW_TRACKING_URI=f"sqlite:///{served.folder / 'mlflow.db'}")
    run(["imgclf", "predict", "--run", served.run_id, "-o", "preds.csv", "-k", "3", *map(str, files)], tmp_path, env)
    rows = list(csv.DictReader((tmp_path / "preds.csv").open()))
    answers_ = requests.post(served.url, json={"inputs": served.images}, timeout=60).json()["predictions"]
    assert [a["class"] for a in answers_] == [r["class"] for r in rows] == served.expected
    assert [a["probability"] for a in answers_] == pytest.approx([float(r["probability"]) for r in rows], abs=1e-6)


@pytest.mark.e2e
@pytest.mark.xdist_group("serving")
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
