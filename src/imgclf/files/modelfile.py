"""models/model.keras on disk: written byte-for-byte deterministically, read back safely.

Keras stamps the save time into the file twice (metadata.json's `date_saved` and the weights member's
zip timestamp), so two bit-identical trainings used to leave two different files, and `dvc.lock` and
`git status` changed on every rerun. `save` rewrites the archive with fixed member order and
timestamps and without the save date; Keras loads it as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from imgclf.errors import ImgclfError, one_line
from imgclf.files.atomic import atomic_write
from imgclf.process import imports_first

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: the same for every member and every run


def _normalise(raw: Path, out: Path) -> None:
    """Copy the .keras zip `raw` to `out` with sorted members, fixed timestamps and no save date."""
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w") as dst:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            data = src.read(info.filename)
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            member = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            member.compress_type, member.external_attr = info.compress_type, 0o644 << 16
            dst.writestr(member, data)


def save(model, path: str | Path) -> Path:
    """Save `model` as a .keras file whose bytes depend only on the model, atomically."""
    path = Path(path)

    def write(tmp: Path) -> None:
        raw = tmp.with_name(tmp.name.replace(".tmp", ".raw.tmp", 1))
        try:
            model.save(raw)
            _normalise(raw, tmp)
        finally:
            raw.unlink(missing_ok=True)

    return atomic_write(path, write)


# What a damaged archive raises from inside Keras, zipfile, json or h5py (a bad CRC, an h5 member that is not h5)
_DAMAGED = (OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}"[:160]


def weights_sha256(model) -> str:
    """sha256 over every weight array in order: equal hashes mean bit-identical models."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w))
    return digest.hexdigest()


RERUN = "rerun the train stage (`dvc repro`) to write it again, or pass a model saved by imgclf"


def check_weights(model, expected: str | None, path: str | Path, recorded_in: str) -> None:
    """Refuse a model whose weights are not the ones training recorded (`expected`; None: no record).

    A .keras file whose HDF5 weights were partly overwritten still loads: zip readers do not check every
    member's CRC and h5py reads what it can, so only the hash tells a damaged model from the trained one."""
    actual = weights_sha256(model) if expected else None
    if actual != expected:
        raise ImgclfError(f"{path}: its weights (sha256 {actual[:12]}) are not the ones training recorded in "
                          f"{recorded_in} ({expected[:12]}): the file is damaged or from another run; {RERUN}")


def load(path: str | Path, expected_sha256: str | None = None, recorded_in: str = "reports/train.json"):
    """Load a saved model for inference only; safe_mode refuses pickled Python lambdas in the file. With
    `expected_sha256` (what training recorded in `recorded_in`), its weights must hash to it."""
    keras = imports_first("keras")  # evaluate's and predict's first import of it

    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except ValueError as exc:  # safe mode's refusal, or not a Keras model file at all
        if not zipfile.is_zipfile(path):  # Keras calls a truncated file "not found"
            raise ImgclfError(f"{path}: not a .keras zip archive (truncated, or another format); {RERUN}") from None
        raise ImgclfError(f"{path}: not loadable as a safe Keras model ({_reason(exc)}); {RERUN}") from None
    except _DAMAGED as exc:
        raise ImgclfError(f"{path}: corrupt Keras model file ({_reason(exc)}); {RERUN}") from None
    check_weights(model, expected_sha256, path, recorded_in)
    return model


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Put Python's and NumPy's global generators back: rebuilding layers draws initializer seeds from
    Python's `random`, and the training that follows must compute exactly the numbers it did without the check."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _round_trip(obj) -> None:
    """What save then load do to `obj`'s config: serialize, JSON and back, from_config in safe mode."""
    import keras

    config = json.loads(json.dumps(keras.saving.serialize_keras_object(obj)))
    if "compile_config" in config:
        config["compile_config"] = None  # load() never compiles
    keras.saving.deserialize_keras_object(config, safe_mode=True)


def _culprit(obj, error: Exception) -> tuple[str, Exception]:
    """The innermost layer of `obj` whose own round trip fails (else `obj` itself) and its error: Keras
    wraps a layer's error in its model's, whose message names neither."""
    for layer in getattr(obj, "layers", []):
        try:
            _round_trip(layer)
        except Exception as exc:
            return _culprit(layer, exc)
    return f"layer {obj.name!r} ({type(obj).__name__})", error


def check_round_trip(model) -> None:
    """Fail now, in one line naming the layer, if `model` could not be loaded back from its saved file.

    save() and load() first exercise this after training: an unregistered custom layer would cost a whole
    run, then fail. Any exception here means the saved model would not load, so all are reported alike.
    """
    with _random_state_kept():
        try:
            _round_trip(model)
        except Exception as exc:
            layer, error = _culprit(model, exc)
            raise ImgclfError(
                f"model {model.name!r}: {layer} does not survive a save and safe load ({_reason(error)}); "
                "decorate custom layers with @keras.saving.register_keras_serializable(), give them a get_config() "
                "and no Lambda (docs/extending.md)"
            ) from None
