"""The served model's input decoding under random requests (Hypothesis), as a hostile client sends them: random JSON
shapes and values, pixel tensors of any dtype and shape with NaN and infinities, random and truncated image bytes
in base64, in each JSON form MLflow accepts. Never a 5xx, never a stack trace, always one line; the good requests
among them answered correctly.

Two layers: to_images itself, in this process, over many examples (fast); then a real `mlflow models serve` on
127.0.0.1 (test_serving.py's session server: one xdist_group, one server) over fewer, each an HTTP request."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from imgclf.data.policy import RequestLimits
from imgclf.serving.request import BadRequest, to_images
from test_serving import FORMS, check_answers, request_body, served  # noqa: F401  (served: the session fixture)

SIZE = 12  # the served tiny net's

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=24)


@st.composite
def encoded_images(draw) -> str:
    """base64 of an image in any format Pillow writes here, possibly truncated or corrupted; or of random bytes."""
    kind = draw(st.sampled_from(["image", "truncated", "flipped", "random"]))
    if kind == "random":
        data = draw(st.binary(max_size=256))
    else:
        fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO"]))
        size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
        mode = "RGB" if fmt in ("JPEG", "PPM") else draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
        buffer = io.BytesIO()
        Image.new(mode, size, draw(st.integers(0, 255))).save(buffer, format=fmt)
        data = buffer.getvalue()
        if kind == "truncated":
            data = data[:draw(st.integers(0, len(data)))]
        elif kind == "flipped" and data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    text = base64.b64encode(data).decode()
    return text if draw(st.booleans()) or not text else text[:-1]  # sometimes not valid base64 any more


def tensors():
    """Pixel batches of any dtype, including the net's own shape, with NaN, infinities, fractions, negatives."""
    shapes = st.sampled_from([(1, SIZE, SIZE, 3), (2, SIZE, SIZE, 3), (SIZE, SIZE, 3), (1, SIZE, SIZE, 1), (3,), ()])
    dtypes = st.sampled_from([np.uint8, np.int64, np.float64, np.float32, np.bool_])
    return dtypes.flatmap(lambda dtype: hnp.arrays(dtype, shapes, elements=None if dtype is np.bool_ else (
        st.floats(allow_nan=True, allow_infinity=True, width=32 if dtype is np.float32 else 64)
        if np.dtype(dtype).kind == "f" else st.integers(0, 300 if dtype is np.int64 else 255))))


ITEMS = st.one_of(
    st.lists(encoded_images(), min_size=1, max_size=3),
    tensors().map(lambda x: x.tolist()),
    st.lists(JSON, max_size=4),
    JSON,
)


def as_mlflow_hands_over(form: str, items):
    """What MLflow's parser makes of a request body in `form`, without the server: for the in-process layer."""
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    return infer_and_parse_data(request_body(form, items) if isinstance(items, list) else {form: items})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=st.sampled_from(FORMS), items=ITEMS)
def test_to_images_takes_or_refuses_in_one_line_whatever_mlflow_hands_over(form, items):
    try:
        parsed = as_mlflow_hands_over(form, items)
    except Exception:  # MLflow's own parser refused the body: the server answers that itself (tested over HTTP)
        return
    limits = RequestLimits(max_images=8, max_request_bytes=1 << 16, max_request_pixels=1 << 16)
    try:
        x = to_images(parsed, SIZE, limits)
    except BadRequest as exc:
        assert exc.get_http_status_code() == 400 and exc.message and "\n" not in exc.message
        return
    assert x.dtype == np.uint8 and x.shape[1:] == (SIZE, SIZE, 3) and len(x) <= limits.max_images


def check_response(response: requests.Response) -> None:
    """Never a 5xx; a refusal is a 400 with no stack trace and, from the model, one line; an answer is strict JSON.
    MLflow's own parser refuses some bodies before the model sees them (`instances` given as an object, ragged
    lists: BAD_REQUEST, "Invalid input. ..."); its message, which the model cannot reach, may take two lines."""
    assert response.status_code < 500, response.text[:2000]
    assert "Traceback" not in response.text and "stack_trace" not in response.text, response.text[:2000]
    if response.status_code != 200:
        body = response.json()
        assert response.status_code == 400 and body["message"] and len(body["message"]) < 600, body
        mlflows = body["error_code"] == "BAD_REQUEST" and body["message"].startswith("Invalid input. ")
        assert mlflows or (body["error_code"] == "INVALID_PARAMETER_VALUE" and "\n" not in body["message"]), body
        return
    answers = json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in an answer"))
    for answer in answers["predictions"]:
        assert 0 <= answer["probability"] <= 1 and answer["class"] == answer["top_k"][0]["class"]


@pytest.mark.e2e
@pytest.mark.xdist_group("serving")
def test_the_server_never_fails_nor_shows_a_stack_trace_and_answers_the_next_good_request(served):  # noqa: F811
    session = requests.Session()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(form=st.sampled_from(FORMS), items=ITEMS)
    def hostile(form, items):
        body = request_body(form, items) if isinstance(items, list) else {form: items}
        check_response(session.post(served.url, data=json.dumps(body), timeout=60,
                                    headers={"Content-Type": "application/json"}))

    hostile()
    check_answers(session.post(served.url, json=request_body("dataframe_records", served.images), timeout=60),
                  served, list(range(len(served.images))))
