"""models/model.keras on disk: written byte-for-byte deterministically, read back safely.

Keras stamps the save time into the file twice (metadata.json's `date_saved` and the weights member's
zip timestamp), so two bit-identical trainings used to leave two different files, and `dvc.lock` and
`git status` changed on every rerun. `save` rewrites the archive with fixed member order and
timestamps and without the save date; Keras loads it as before.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from imgclf.errors import ImgclfError
from imgclf.files import atomic_write

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


def load(path: str | Path):
    """Load a saved model for inference only; safe_mode refuses pickled Python lambdas in the file."""
    import keras

    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except ValueError as exc:  # safe mode's refusal, or not a Keras model file at all
        reason = " ".join(str(exc).split())[:160]
        raise ImgclfError(f"{path}: not loadable as a safe Keras model ({reason}); use a model saved by imgclf") from None
