"""`imgclf predict PATH...`: class, probability and the top-k classes per image, printed or written to a CSV.

PATHs are image files, folders (searched recursively for the images the folder source reads) and glob patterns.
The model is models/model.keras, a logged run's (`--run`) or a registered version (`--model models:/NAME@ALIAS`).
Images are read, converted as `prepare` converts a folder's (RGB, resized to the net's size) and predicted BATCH at
a time, so memory stays bounded whatever their number. A missing or unreadable image is a row with its error; the
others are predicted, and the command then ends with one line counting the failures (exit 2).
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from imgclf.data.images import IMAGE_SUFFIXES, load_image
from imgclf.errors import DataError, ImgclfError
from imgclf.files import modelfile
from imgclf.files.atomic import atomic_write, read_json
from imgclf.files.paths import MANIFEST, MODEL_PATH, PREPARED_DIR, REPORTS_DIR, TRAIN_SUMMARY
from imgclf.tta import probabilities, ranked

BATCH = 256  # images read and predicted at once: what predict holds in memory


class Prediction(NamedTuple):
    path: str
    cls: str             # "" when the image could not be read
    probability: float   # of `cls`
    top: list            # [(class, probability)], most probable first
    error: str = ""


def load_run_model(run_id: str):
    """The Keras net and class names of the model logged on an MLflow run (the served pyfunc, serving/pyfunc.py)."""
    from imgclf.tracking.store import configure

    configure()
    return _logged_model(run_id)


def _logged_model(run_id: str):
    """load_run_model once the store is configured: the pyfunc's net, checked against the run's weights hash."""
    import mlflow

    from imgclf.tracking.failures import run_failure

    try:
        served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").unwrap_python_model()
        expected = mlflow.tracking.MlflowClient().get_run(run_id).data.tags.get("weights_sha256")
    except mlflow.exceptions.MlflowException as exc:
        raise run_failure(run_id, exc, "check the run id in `mlflow ui`") from None
    modelfile.check_weights(served.model, expected, f"the model of MLflow run {run_id}", "its weights_sha256 tag")
    return served.model, served.classes


def load_registered_model(uri: str):
    """A registered model version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`): its run's model and classes."""
    import mlflow

    from imgclf.tracking.failures import store_failure, unreachable
    from imgclf.tracking.store import configure

    configure()
    try:
        run_id = mlflow.models.get_model_info(uri).run_id
    except mlflow.exceptions.MlflowException as exc:
        if unreachable(exc):
            raise store_failure(exc, "rerun") from None
        raise ImgclfError(f"{uri}: {str(exc).splitlines()[0]}; `imgclf promote RUN_ID` sets an alias, "
                          "`mlflow ui` lists the registered models") from None
    return _logged_model(run_id)


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


def load_model(run_id: str | None, model: str | None):
    if run_id:
        return load_run_model(run_id)
    if model and model.startswith("models:/"):
        return load_registered_model(model)
    return load_local_model(model or MODEL_PATH)


def expand(paths: Iterable[str]) -> list[str]:
    """Files as given; folders searched recursively for images (dotfiles left out); glob patterns expanded.
    A pattern that matches nothing stays, to become a row that says so."""
    found = []
    for arg in paths:
        matches = sorted(glob.glob(arg, recursive=True)) if glob.has_magic(arg) else [arg]
        for path in matches or [arg]:
            if os.path.isdir(path):
                found += sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                                and p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            else:
                found.append(path)
    return found


def predictions(model, classes: list[str], paths: list[str], tta: str, top_k: int) -> Iterator[Prediction]:
    """One Prediction per path, in order, BATCH images at a time."""
    size = model.input_shape[1]
    for start in range(0, len(paths), BATCH):
        chunk, images, errors = paths[start:start + BATCH], [], {}
        for path in chunk:
            try:
                images.append(load_image(path, size))
            except (DataError, OSError) as exc:
                errors[path] = str(exc) if isinstance(exc, DataError) else f"{path}: {exc.strerror or exc}"
        probs = iter(probabilities(model, np.stack(images), tta) if images else [])
        for path in chunk:
            if path in errors:
                yield Prediction(path, "", float("nan"), [], errors[path])
                continue
            top = ranked(next(probs), classes, top_k)
            yield Prediction(path, *top[0], top)


def write_csv(rows: Iterator[Prediction], output: Path, top_k: int, total: int) -> list[Prediction]:
    """Stream the rows into `output` (atomically: a killed run leaves no half file); a progress line on a terminal."""
    done: list[Prediction] = []
    header = ["path", "class", "probability", *(f"top{i}_{k}" for i in range(1, top_k + 1)
                                                 for k in ("class", "probability")), "error"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(header)
            for row in rows:
                top = [v for name, prob in row.top for v in (name, f"{prob:.6f}")]
                top += [""] * (2 * top_k - len(top))
                prob = "" if row.error else f"{row.probability:.6f}"
                out.writerow([row.path, row.cls, prob, *top, row.error])
                done.append(row)
                if sys.stderr.isatty():
                    print(f"\rpredicted {len(done):,}/{total:,} images", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)

    atomic_write(output, write)
    return done


def print_rows(rows: Iterator[Prediction], top_k: int) -> list[Prediction]:
    """`path<TAB>class<TAB>probability` per image (with --top-k: `<TAB>class:probability,...`); errors say so."""
    done = []
    for row in rows:
        if row.error:
            print(f"{row.path}\terror\t{row.error}")
        else:
            top = "\t" + ",".join(f"{name}:{prob:.4f}" for name, prob in row.top) if top_k > 1 else ""
            print(f"{row.path}\t{row.cls}\t{row.probability:.4f}{top}")
        done.append(row)
    return done


def main(images: list[str], run_id: str | None = None, model_path: str | None = None, tta: str = "none",
         output: str | None = None, top_k: int = 1) -> list[Prediction]:
    """Predict every image PATH names (logits averaged over `tta`'s views); print or write `output` as CSV."""
    paths = expand(images)
    model, classes = load_model(run_id, model_path)
    top_k = max(1, min(top_k, len(classes)))
    rows = predictions(model, classes, paths, tta, top_k)
    done = write_csv(rows, Path(output), top_k, len(paths)) if output else print_rows(rows, top_k)
    failed = [row for row in done if row.error]
    if failed:
        where = f"their rows in {output} say why" if output else "see their lines above"
        raise ImgclfError(f"{len(failed)} of {len(done)} images could not be predicted (first: {failed[0].error}); "
                          f"{where}; the others were predicted")
    if output:
        print(f"Predicted {len(done):,} images -> {output}")
    return done
