"""`imgclf predict`: class and probability per image, from models/model.keras or an MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data import PREPARED_DIR, load_image
from imgclf.io import ImgclfError, read_json
from imgclf.train import MODEL_PATH


def load_run_model(run_id: str):
    """The Keras model logged on an MLflow run, and the class names from its data manifest."""
    import mlflow

    from imgclf.tracking import configure, run_failure

    configure()
    try:
        model = mlflow.keras.load_model(f"runs:/{run_id}/model")
        manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/data/manifest.json")
    except mlflow.exceptions.MlflowException as exc:
        raise run_failure(run_id, exc, "check the run id in `mlflow ui`") from None
    return model, manifest["classes"]


def load_local_model(model_path: str | Path):
    """A saved .keras model, and the class names from the prepared data's manifest."""
    from imgclf.model import load_model

    if not Path(model_path).is_file():
        raise ImgclfError(f"{model_path}: no model there; run `make run` (or `dvc repro`) or pass --model/--run")
    classes = read_json(Path(PREPARED_DIR) / "manifest.json", "data manifest")["classes"]
    return load_model(str(model_path)), classes


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main(images: list[str], run_id: str | None = None, model_path: str | None = None) -> list[tuple[str, str, float]]:
    """Print `image<TAB>class<TAB>probability` for each image; returns the same rows."""
    model, classes = load_run_model(run_id) if run_id else load_local_model(model_path or MODEL_PATH)
    batch = np.stack([load_image(path) for path in images]).astype(np.float32)
    probs = softmax(np.asarray(model.predict(batch, verbose=0), dtype=np.float64))
    rows = [(path, classes[int(p.argmax())], float(p.max())) for path, p in zip(images, probs)]
    for path, name, prob in rows:
        print(f"{path}\t{name}\t{prob:.4f}")
    return rows
