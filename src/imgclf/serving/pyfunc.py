"""The served model: an MLflow pyfunc around the trained Keras net that answers with class names.

`mlflow models serve -m runs:/RUN_ID/model` (or `models:/NAME@champion`) loads this class. Per image it answers
the class, its probability and the top-k classes with theirs, under the run's `evaluate.tta`, computed by the
same code as `imgclf predict` (tta.probabilities), so both give the same numbers. It takes a batch of 0-255 RGB
pixels at the net's size (whole numbers, uint8 or float) or encoded images (PNG/JPEG/BMP/GIF; base64 strings in
JSON), which are converted as `prepare` converts a folder's images, in any of MLflow's JSON forms, within the
request limits of data/policy.py; serving/request.py answers anything else with a one-line HTTP 400
(docs/serving.md). When it loads, the net's weights must hash to the sha256 logged with it and its outputs must
match the class names, or the server does not start.

The sha256 is an artifact (weights.json), not model_config: MLflow logs every model_config key as a run parameter,
and the hash is a result, not a setting (the training run's `weights_sha256` tag holds it too). A model logged
before has it in model_config, and still loads and is still checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the server imports TensorFlow through this module

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

TOP_K = 3  # classes per answer (at most the number of classes)
WEIGHTS_JSON = "weights.json"  # the artifact that holds {"weights_sha256": ...}


def answers(probs: np.ndarray, classes: list[str], top_k: int) -> list[dict]:
    """Per image: {"class", "probability", "top_k": [{"class", "probability"}, ...]}, most probable first."""
    from imgclf.tta import ranked

    rows = []
    for p in probs:
        top = [{"class": name, "probability": prob} for name, prob in ranked(p, classes, top_k)]
        rows.append({"class": top[0]["class"], "probability": top[0]["probability"], "top_k": top})
    return rows


def recorded_weights(context) -> tuple[str | None, str]:
    """The weights' sha256 logged with the model, and where: its weights.json artifact, or (a model logged before
    that artifact) its model_config; None where neither has one."""
    from imgclf.errors import ImgclfError, one_line

    if "weights" not in context.artifacts:
        return (context.model_config or {}).get("weights_sha256"), "the logged model's model_config"
    path = Path(context.artifacts["weights"])
    try:
        sha = json.loads(path.read_text(encoding="utf-8"))["weights_sha256"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        sha, reason = None, f"{type(exc).__name__}: {one_line(exc)}"[:160]
    else:
        reason = f"weights_sha256 is {sha!r:.80}"
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ImgclfError(f"{path}: not the {{\"weights_sha256\": \"<64 hex digits>\"}} training logs ({reason}); "
                          "log the model again (rerun training) or serve another run's")
    return sha, f"the logged {WEIGHTS_JSON}"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: the .keras net, class names and weights' sha256 as artifacts; TTA, top-k, limits as model_config."""

    # Its input is a tensor or encoded images in any of MLflow's JSON forms, which no single type hint names:
    # to_images checks it and answers a bad one in one line. Without this MLflow asks for type hints in a
    # warning each time the class is defined (at import, and again when log_model runs this file).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import keras

        from imgclf.data.policy import RequestLimits
        from imgclf.files.modelfile import check_weights
        from imgclf.serving.classes import check_outputs

        path = context.artifacts["model"]
        expected, recorded_in = recorded_weights(context)
        self.model = keras.saving.load_model(path, compile=False, safe_mode=True)
        check_weights(self.model, expected, path, recorded_in)
        config = context.model_config or {}
        names = json.loads(Path(context.artifacts["classes"]).read_text())
        self.classes = check_outputs(self.model, names, path, "the logged classes.json")
        self.tta, self.top_k = config.get("tta", "none"), int(config.get("top_k", TOP_K))
        self.limits = RequestLimits.from_config(config)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from imgclf.serving.request import to_images
        from imgclf.tta import probabilities

        images = to_images(model_input, self.model.input_shape[1], self.limits)
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
    """Log the model as the pyfunc `mlflow models serve` runs (this module): the .keras net, the class names and the
    weights' sha256 as artifacts, the package's code beside them; the run's TTA, top-k and the request limits (the
    settings a server may override) as its model_config; with its signature and an input example."""
    import keras
    import numpy as np
    import pandas as pd
    import tensorflow as tf
    from mlflow.models import infer_signature

    from imgclf.data.policy import RequestLimits
    from imgclf.files.modelfile import save, weights_sha256

    size = model.input_shape[1]
    example = np.zeros((1, size, size, 3), np.uint8)  # one black image: a valid request of the smallest size
    # The output's schema from a real answer's shape; inputs stay unenforced: tensors and base64 strings are both
    # valid, and serving/request.py answers a bad request in one line, where MLflow's check would print it whole.
    top_k = min(TOP_K, len(classes))
    uniform = np.full((1, len(classes)), 1 / len(classes))
    signature = infer_signature(None, pd.DataFrame(answers(uniform, classes, top_k)))
    # Explicit requirements: MLflow's inference would import the model in a subprocess (slow).
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", f"mlflow=={mlflow.__version__}",
                    f"pillow=={__import__('PIL').__version__}", f"pandas=={pd.__version__}"]
    with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp, quiet_logger("mlflow.pyfunc"):
        save(model, Path(tmp) / "model.keras")
        (Path(tmp) / "classes.json").write_text(json.dumps(classes))
        (Path(tmp) / WEIGHTS_JSON).write_text(json.dumps({"weights_sha256": weights_sha256(model)}))
        mlflow.pyfunc.log_model(
            name="model", python_model=__file__, code_paths=[package_copy(Path(tmp) / "code")],
            artifacts={name: str(Path(tmp) / file) for name, file in
                       (("model", "model.keras"), ("classes", "classes.json"), ("weights", WEIGHTS_JSON))},
            # Every model_config key becomes a run param (MLflow): only settings here, no results.
            model_config={"tta": tta, "top_k": top_k, **RequestLimits().as_config()},
            signature=signature, input_example=example,
            pip_requirements=requirements, registered_model_name=register_as)


# MLflow's models-from-code: tracking logs this file as the model's code, and loading the model runs it.
mlflow.models.set_model(ImageClassifier())
