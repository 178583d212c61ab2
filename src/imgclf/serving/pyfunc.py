"""The served model: an MLflow pyfunc around the trained Keras net that answers with class names.

`mlflow models serve -m runs:/RUN_ID/model` (or `models:/NAME@champion`) loads this class. Per image it answers
the class, its probability and the top-k classes with theirs, under the run's `evaluate.tta`, computed by the
same code as `imgclf predict` (tta.probabilities), so both give the same numbers. It takes a batch of 0-255 RGB
pixels at the net's size (uint8 or float; JSON `{"inputs": [...]}`) or encoded images (PNG/JPEG/...; base64
strings in JSON), which are converted as `prepare` converts a folder's images. Anything else is a short HTTP 400
saying what was expected (docs/serving.md).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the server imports TensorFlow through this module

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # noqa: E402

TOP_K = 3  # classes per answer (at most the number of classes)


class BadRequest(MlflowException):
    """HTTP 400 with our one line only: the scoring server prepends the whole request to an MlflowException's
    message (`Failed to predict data '<the array>'`), so this message ignores that assignment."""

    def __init__(self, message: str):
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        pass


def _column(model_input) -> np.ndarray:
    """The images of a request as one array: a tensor, or the only (or `image`) column of a table."""
    if hasattr(model_input, "columns"):  # pandas: dataframe_split/records, or `inputs` given as a list of strings
        columns = list(model_input.columns)
        name = "image" if "image" in columns else columns[0] if len(columns) == 1 else None
        if name is None:
            raise BadRequest(f"a table with columns {columns}: send one column `image` of base64-encoded images")
        return np.asarray(model_input[name].tolist(), dtype=object)
    return np.asarray(model_input)


def _decode(item, size: int, index: int) -> np.ndarray:
    from imgclf.data.images import decode_image
    from imgclf.errors import DataError

    try:
        data = item if isinstance(item, bytes) else base64.b64decode(item, validate=True)
        return decode_image(data, Path(f"image {index}"), size)
    except (binascii.Error, ValueError):
        raise BadRequest(f"image {index}: not base64; send encoded images (PNG, JPEG, ...) as base64 strings") from None
    except DataError as exc:
        raise BadRequest(str(exc).split(";")[0] + "; send a PNG, JPEG, BMP or GIF file's bytes") from None


def to_images(model_input, size: int) -> np.ndarray:
    """(N, size, size, 3) pixels 0-255 from a request; a BadRequest naming what was expected otherwise."""
    x = _column(model_input)
    expected = f"a batch of shape (N, {size}, {size}, 3), RGB pixels 0-255"
    if x.dtype.kind in "OUS":
        if x.ndim != 1:
            raise BadRequest(f"a {x.ndim}-D array of strings; send a list of base64-encoded images")
        return np.stack([_decode(item, size, i) for i, item in enumerate(x)]) if len(x) else x
    if x.dtype.kind not in "uif":
        raise BadRequest(f"{x.dtype} values; send {expected}")
    if x.ndim == 3 and x.shape == (size, size, 3):
        raise BadRequest(f"one image of shape {x.shape} without the batch axis; send {expected}: [[...]]")
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise BadRequest(f"shape {x.shape}; send {expected}, or base64-encoded images of any size")
    if len(x) and (x.min() < 0 or x.max() > 255):
        raise BadRequest(f"pixels from {x.min():g} to {x.max():g}; send {expected}")
    if len(x) and x.dtype.kind == "f" and x.max() <= 1.0:
        raise BadRequest(f"pixels from {x.min():g} to {x.max():g} look scaled to [0, 1]; send 0-255 values "
                         "(multiply by 255)")
    return x


def answers(probs: np.ndarray, classes: list[str], top_k: int) -> list[dict]:
    """Per image: {"class", "probability", "top_k": [{"class", "probability"}, ...]}, most probable first."""
    from imgclf.tta import ranked

    rows = []
    for p in probs:
        top = [{"class": name, "probability": prob} for name, prob in ranked(p, classes, top_k)]
        rows.append({"class": top[0]["class"], "probability": top[0]["probability"], "top_k": top})
    return rows


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: the .keras net and class names as artifacts, the TTA and top-k as model_config."""

    # Its input is a tensor or encoded images in any of MLflow's JSON forms, which no single type hint names:
    # to_images checks it and answers a bad one in one line. Without this MLflow asks for type hints in a
    # warning each time the class is defined (at import, and again when log_model runs this file).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts["model"], compile=False, safe_mode=True)
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())
        config = context.model_config or {}
        self.tta, self.top_k = config.get("tta", "none"), int(config.get("top_k", TOP_K))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from imgclf.tta import probabilities

        images = to_images(model_input, self.model.input_shape[1])
        probs = probabilities(self.model, images, self.tta) if len(images) else np.zeros((0, len(self.classes)))
        return pd.DataFrame(answers(probs, self.classes, self.top_k), columns=["class", "probability", "top_k"])


def package_copy(dest: Path) -> str:
    """This package's source, without bytecode, at dest/imgclf: the code a served model runs with."""
    source = Path(__file__).resolve().parents[1]  # src/imgclf: this module is in its serving/ wing
    shutil.copytree(source, dest / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest / source.name)


@contextlib.contextmanager
def quiet_logger(name: str):
    """`name`'s INFO lines off for a while (MLflow announces that it validates the input example, per run)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def log_served_model(model, classes: list[str], tta: str, register_as: str | None) -> None:
    """Log the model as the pyfunc `mlflow models serve` runs (this module): the .keras net and the class names as
    artifacts, the package's code beside them, the run's TTA; with its signature and an input example."""
    import keras
    import numpy as np
    import pandas as pd
    import tensorflow as tf
    from mlflow.models import infer_signature

    from imgclf.files.modelfile import save

    size = model.input_shape[1]
    example = np.zeros((1, size, size, 3), np.uint8)  # one black image: a valid request of the smallest size
    # The output's schema from a real answer's shape; inputs stay unenforced: tensors and base64 strings are both
    # valid, and serving.to_images answers a bad request in one line, where MLflow's check would print it whole.
    top_k = min(TOP_K, len(classes))
    uniform = np.full((1, len(classes)), 1 / len(classes))
    signature = infer_signature(None, pd.DataFrame(answers(uniform, classes, top_k)))
    # Explicit requirements: MLflow's inference would import the model in a subprocess (slow).
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", f"mlflow=={mlflow.__version__}",
                    f"pillow=={__import__('PIL').__version__}", f"pandas=={pd.__version__}"]
    with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp, quiet_logger("mlflow.pyfunc"):
        save(model, Path(tmp) / "model.keras")
        (Path(tmp) / "classes.json").write_text(json.dumps(classes))
        mlflow.pyfunc.log_model(
            name="model", python_model=__file__, code_paths=[package_copy(Path(tmp) / "code")],
            artifacts={"model": str(Path(tmp) / "model.keras"), "classes": str(Path(tmp) / "classes.json")},
            model_config={"tta": tta, "top_k": top_k}, signature=signature, input_example=example,
            pip_requirements=requirements, registered_model_name=register_as)


# MLflow's models-from-code: tracking logs this file as the model's code, and loading the model runs it.
mlflow.models.set_model(ImageClassifier())
