"""`imgclf predict PATH...`: class, probability and the top-k classes per image, printed or written to a CSV.

PATHs are image files (taken as given), folders (walked by files/walk.py for the images the folder source reads)
and glob patterns (their image files, and the images of the folders they match); a file found twice is predicted
once. The model is models/model.keras, a logged run's (`--run`, with that run's TTA) or a registered version
(`--model models:/NAME@ALIAS`). Images are read under the input policy (data/policy.py: regular files of bounded
size, the formats prepare reads), converted as `prepare` converts a folder's (RGB, resized to the net's size),
predicted BATCH at a time and streamed out row by row, so memory stays bounded whatever their number. A missing or
unreadable image is a row with its error; the others are predicted, and the command then ends with one line
counting the failures (exit 2).
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, TextIO

import numpy as np

from imgclf.data.images import IMAGE_SUFFIXES, load_image
from imgclf.errors import DataError, ImgclfError
from imgclf.files import modelfile
from imgclf.files.atomic import atomic_write, read_json
from imgclf.files.paths import MANIFEST, MODEL_PATH, PREPARED_DIR, REPORTS_DIR, TRAIN_SUMMARY
from imgclf.files.walk import check_utf8, walk_files
from imgclf.serving.classes import check_outputs
from imgclf.tta import probabilities, ranked

BATCH = 256  # images read and predicted at once: what predict holds in memory


class Prediction(NamedTuple):
    path: str
    cls: str             # "" when the image could not be read
    probability: float   # of `cls`
    top: list            # [(class, probability)], most probable first
    error: str = ""


def load_run_model(run_id: str):
    """The Keras net, class names and TTA of the model logged on an MLflow run (the served pyfunc, serving/pyfunc.py,
    whose loading checks the weights against the hash logged with them and the outputs against the names)."""
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
    return served.model, served.classes, served.tta


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
    """A saved .keras model and the class names from the prepared data's manifest (no TTA of its own: None)."""
    if not Path(model_path).is_file():
        raise ImgclfError(f"{model_path}: no model there; run `make run` (or `dvc repro`) or pass --model/--run")
    manifest = Path(PREPARED_DIR) / MANIFEST
    classes = read_json(manifest, "data manifest")["classes"]
    model = modelfile.load(model_path, *recorded_weights(model_path))
    return model, check_outputs(model, classes, str(model_path), str(manifest)), None


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


def _glob(pattern: str, walked: list[str]) -> Iterator[str]:
    """A glob's image files, and the images of the folders it matches, each folder walked once: `pics/**` matches
    `pics/` and every folder in it, and Python's glob follows a symlinked folder into a loop until the kernel's
    ELOOP, so a folder inside one walked already (or reached through a loop) is the walk's already."""
    for match in sorted(glob.glob(pattern, recursive=True)):
        try:
            real = os.path.realpath(match, strict=True)
        except OSError:  # a path through a symlink loop, deeper than the kernel resolves: glob's detour
            continue
        if os.path.isdir(match):
            if not any(real == top or real.startswith(top.rstrip(os.sep) + os.sep) for top in walked):
                walked.append(real)
                yield from map(str, walk_files(match, IMAGE_SUFFIXES))
        elif Path(match).suffix.lower() in IMAGE_SUFFIXES:
            yield match


def expand(paths: Iterable[str]) -> list[str]:
    """Files as given; folders walked for images (files/walk.py); glob patterns expanded to their image files and
    their folders' images; a path that is not UTF-8 is refused in one line (files/walk.py). A file reached twice (`pics/**` matches a folder and the files in it; a symlink to a
    folder listed already) is listed once, where first reached. A pattern that matches nothing stays, to become a
    row that says so."""
    found: dict[str, str] = {}  # real path -> the path as first reached, in order
    walked: list[str] = []  # the real paths of the folders walked
    for arg in paths:
        if glob.has_magic(arg):
            files = list(_glob(arg, walked)) or [arg]
        elif os.path.isdir(arg):
            walked.append(os.path.realpath(arg))
            files = list(map(str, walk_files(arg, IMAGE_SUFFIXES)))
        else:
            files = [arg]
        for path in files:
            check_utf8(path)  # the CSV and the terminal take text: refused before any prediction is made
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


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


class Counts(NamedTuple):
    done: int          # rows written
    failed: int        # of them, images that could not be predicted
    first_error: str   # the first failure's message


def _count(rows: Iterator[Prediction], counts: list) -> Iterator[Prediction]:
    """Pass the rows through, counting them into counts = [done, failed, first error]: nothing else is kept."""
    for row in rows:
        counts[0] += 1
        if row.error:
            counts[1] += 1
            counts[2] = counts[2] or row.error
        yield row


def write_csv(rows: Iterator[Prediction], output: Path, top_k: int, total: int,
              progress: TextIO | None = None) -> None:
    """Stream the rows into `output` (atomically: a killed run leaves no half file); a progress line to `progress`.
    The terminal is taken by the caller: atomic_write holds stderr back while the file is written."""
    header = ["path", "class", "probability", *(f"top{i}_{k}" for i in range(1, top_k + 1)
                                                 for k in ("class", "probability")), "error"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(header)
            for done, row in enumerate(rows, 1):
                top = [v for name, prob in row.top for v in (name, f"{prob:.6f}")]
                top += [""] * (2 * top_k - len(top))
                prob = "" if row.error else f"{row.probability:.6f}"
                out.writerow([row.path, row.cls, prob, *top, row.error])
                if progress and (done % BATCH == 0 or done == total):
                    print(f"\rpredicted {done:,}/{total:,} images", end="", file=progress, flush=True)
        if progress:
            print(file=progress, flush=True)

    atomic_write(output, write)


def print_rows(rows: Iterator[Prediction], top_k: int) -> None:
    """`path<TAB>class<TAB>probability` per image (with --top-k: `<TAB>class:probability,...`); errors say so."""
    for row in rows:
        if row.error:
            print(f"{row.path}\terror\t{row.error}")
        else:
            top = "\t" + ",".join(f"{name}:{prob:.4f}" for name, prob in row.top) if top_k > 1 else ""
            print(f"{row.path}\t{row.cls}\t{row.probability:.4f}{top}")


def check_output(output: str) -> None:
    """Refuse an --output that could not be written, before any image is read: a folder, or a place not writable."""
    path = Path(output)
    if path.is_dir():
        raise ImgclfError(f"{output}: a folder; name the CSV file to write (e.g. {path / 'predictions.csv'})")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ImgclfError(f"{output}: cannot be written ({parent} is not a writable folder); fix its permissions "
                          "or choose another --output")


def main(images: list[str], run_id: str | None = None, model_path: str | None = None, tta: str | None = None,
         output: str | None = None, top_k: int = 1) -> Counts:
    """Predict every image PATH names (logits averaged over `tta`'s views: by default a logged model's own TTA,
    none for a .keras file); print the rows or write them to `output` as CSV. Returns the rows' counts."""
    if output:
        check_output(output)
    paths = expand(images)
    model, classes, logged_tta = load_model(run_id, model_path)
    top_k = max(1, min(top_k, len(classes)))
    counts = [0, 0, ""]
    rows = _count(predictions(model, classes, paths, tta or logged_tta or "none", top_k), counts)
    if output:
        write_csv(rows, Path(output), top_k, len(paths), sys.stderr if sys.stderr.isatty() else None)
    else:
        print_rows(rows, top_k)
    done, failed, first = counts
    if failed:
        where = f"their rows in {output} say why" if output else "see their lines above"
        raise ImgclfError(f"{failed} of {done} images could not be predicted (first: {first}); {where}; the others "
                          "were predicted")
    if output:
        print(f"Predicted {done:,} images -> {output}")
    return Counts(done, failed, first)
