"""`imgclf predict`: class and probability per image, from models/model.keras or an MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf import modelfile
from imgclf.errors import ImgclfError
from imgclf.files import read_json
from imgclf.images import load_image
from imgclf.paths import MANIFEST, MODEL_PATH, PREPARED_DIR, REPORTS_DIR, TRAIN_SUMMARY
from imgclf.tta import predict_logits


def load_run_model(run_id: str):
    """The Keras model logged on an MLflow run, and the class names from its data manifest."""
    import mlflow

    from imgclf.tracking import configure, run_failure

    configure()
    try:
        model = mlflow.keras.load_model(f"runs:/{run_id}/model")
        manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/data/{MANIFEST}")
        expected = mlflow.tracking.MlflowClient().get_run(run_id).data.tags.get("weights_sha256")
    except mlflow.exceptions.MlflowException as exc:
        raise run_failure(run_id, exc, "check the run id in `mlflow ui`") from None
    modelfile.check_weights(model, expected, f"the model of MLflow run {run_id}", "its weights_sha256 tag")
    return model, manifest["classes"]


def load_local_model(model_path: str | Path):
    """A saved .keras model, and the class names from the prepared data's manifest."""
    if not Path(model_path).is_file():
        raise ImgclfError(f"{model_path}: no model there; run `make run` (or `dvc repro`) or pass --model/--run")
    classes = read_json(Path(PREPARED_DIR) / MANIFEST, "data manifest")["classes"]
    return modelfile.load(model_path, *recorded_weights(model_path)), classes


def recorded_weights(model_path: str | Path) -> tuple[str | None, str]:
    """The weights sha256 training recorded for the pipeline's own model (reports/train.json), and where;
    (None, "") for any other file, which has no record to check it against."""
    summary = Path(REPORTS_DIR) / TRAIN_SUMMARY
    if Path(model_path).resolve() != Path(MODEL_PATH).resolve() or not summary.is_file():
        return None, ""
    return read_json(summary, "training summary").get("weights_sha256"), str(summary)


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
