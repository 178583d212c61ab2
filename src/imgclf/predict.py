"""`imgclf predict`: class and probability per image, from models/model.keras or an MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.files import modelfile
from imgclf.errors import ImgclfError
from imgclf.files.atomic import read_json
from imgclf.data.images import load_image
from imgclf.files.paths import MANIFEST, MODEL_PATH, PREPARED_DIR
from imgclf.tta import predict_logits


def load_run_model(run_id: str):
    """The Keras model logged on an MLflow run, and the class names from its data manifest."""
    import mlflow

    from imgclf.tracking.failures import run_failure
    from imgclf.tracking.store import configure

    configure()
    try:
        model = mlflow.keras.load_model(f"runs:/{run_id}/model")
        manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/data/{MANIFEST}")
    except mlflow.exceptions.MlflowException as exc:
        raise run_failure(run_id, exc, "check the run id in `mlflow ui`") from None
    return model, manifest["classes"]


def load_local_model(model_path: str | Path):
    """A saved .keras model, and the class names from the prepared data's manifest."""
    if not Path(model_path).is_file():
        raise ImgclfError(f"{model_path}: no model there; run `make run` (or `dvc repro`) or pass --model/--run")
    classes = read_json(Path(PREPARED_DIR) / MANIFEST, "data manifest")["classes"]
    return modelfile.load(model_path), classes


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main(images: list[str], run_id: str | None = None, model_path: str | None = None,
         tta: str = "none") -> list[tuple[str, str, float]]:
    """Print `image<TAB>class<TAB>probability` for each image (logits averaged over `tta`'s views)."""
    model, classes = load_run_model(run_id) if run_id else load_local_model(model_path or MODEL_PATH)
    size = model.input_shape[1]  # images are converted like the folder source's: RGB, resized to the net's size
    batch = np.stack([load_image(path, size) for path in images])
    probs = softmax(np.asarray(predict_logits(model, batch, tta), dtype=np.float64))
    rows = [(path, classes[int(p.argmax())], float(p.max())) for path, p in zip(images, probs)]
    for path, name, prob in rows:
        print(f"{path}\t{name}\t{prob:.4f}")
    return rows
