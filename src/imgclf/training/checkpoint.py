"""Resumable training: after every epoch, everything needed to continue bit-identically.

A checkpoint is `state.json` plus the files it names: the weights file (model + optimizer variables,
Keras' `save_weights`, so the step count that drives a learning-rate schedule too) and one `.npz` per
stateful callback that has arrays (Keras' best weights under monitor=val_loss, the fast family's
lookahead weights). Keras does not save the dropout layers' RNG state, so state.json records it;
the data order and augmentation need no state because they are derived from (seed, epoch, index).
A checkpoint belongs to one fingerprint (seed, model, train params, the prepared data's digest, the train
stage's code and the versions of TensorFlow, Keras and NumPy): any other configuration ignores it and starts
afresh, and so does a checkpoint whose files cannot be read back (one line, then it is deleted).

A stateful callback has a `state_name` and `get_state() -> (dict, arrays or None)` /
`set_state(dict, arrays or None)`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np

from imgclf.files.code import code_digest
from imgclf.errors import one_line
from imgclf.files.atomic import atomic_write, write_json
from imgclf.files.paths import CHECKPOINT_STATE

# What reading back a damaged checkpoint, or one of a net the fingerprint did not tell apart, raises.
UNUSABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile)


def code_identity() -> dict:
    """What decides the weights besides params and data: the train stage's code and the library versions
    (a checkpoint of other code may not even load into this net)."""
    import tensorflow as tf

    return {"code": code_digest(), "tensorflow": tf.__version__, "keras": keras.version(), "numpy": np.__version__}


def fingerprint(params: dict, data_digest: str, code: dict | None = None) -> str:
    """What must match for a checkpoint to be resumed: the training params, the data and the code
    (`code_identity()` unless given)."""
    key = {k: params[k] for k in ("seed", "model", "train")} | {"data_digest": data_digest}
    key |= code_identity() if code is None else code
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _seed_states(model: keras.Model) -> list:
    """The dropout layers' SeedGenerator state variables, in a stable order."""
    return [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]


def _read_state(path: Path) -> dict | None:
    """state.json's object, or None when the file holds anything else (not JSON, not UTF-8, not an object)."""
    try:
        state = json.loads(path.read_text())
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def _why_not(state: dict | None, ckpt_dir: Path, expected_fingerprint: str) -> str | None:
    """Why this checkpoint cannot be resumed here, or None."""
    if state is None:
        return "its state.json is not a checkpoint's state"
    if state.get("fingerprint") != expected_fingerprint:
        return "it belongs to other params, data or code"
    weights = state.get("weights")
    if not isinstance(weights, str) or not (ckpt_dir / weights).is_file():
        return "its weights file is missing"
    return None


def _discard(ckpt_dir: str | Path, why: str, delete: bool) -> None:
    """One line, and (delete: only the process that writes checkpoints may) the checkpoint goes."""
    print(f"Ignoring the checkpoint in {ckpt_dir}: {why}; starting afresh.")
    if delete:
        clear(ckpt_dir)


def load(ckpt_dir: str | Path, expected_fingerprint: str, clear_stale: bool = True) -> dict | None:
    """The saved state if it exists and matches this configuration, else None (a stale or unreadable one
    is deleted when clear_stale)."""
    path = Path(ckpt_dir) / CHECKPOINT_STATE
    if not path.is_file():
        return None
    state = _read_state(path)
    why = _why_not(state, Path(ckpt_dir), expected_fingerprint)
    if why:
        _discard(ckpt_dir, why, clear_stale)
        return None
    return state


def _read_arrays(ckpt_dir: str | Path, saved: dict) -> list | None:
    if not saved.get("arrays"):
        return None
    with np.load(Path(ckpt_dir) / saved["arrays"]) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


def restore(model: keras.Model, state: dict, ckpt_dir: str | Path, clear_unusable: bool = True) -> dict | None:
    """Load weights, optimizer variables and dropout RNG state saved after epoch `state['epoch']`, and read
    the callbacks' arrays: the state with them (`callback_arrays`), for restore_callbacks.

    None, after one line, when the files cannot be read back: every variable is put back as built (Keras
    may have loaded some layers before it failed), so the run starts exactly as one without a checkpoint;
    the checkpoint is deleted when clear_unusable.
    """
    if not model.optimizer.built:  # as a resumed run does; the variables start at zero either way
        model.optimizer.build(model.trainable_variables)
    variables = [*model.variables, *model.optimizer.variables]
    as_built = [v.numpy() for v in variables]
    try:
        model.load_weights(Path(ckpt_dir) / state["weights"])
        for variable, value in zip(_seed_states(model), state["seed_states"]):
            variable.assign(np.asarray(value, dtype=variable.dtype))
        arrays = {name: _read_arrays(ckpt_dir, saved) for name, saved in state["callbacks"].items()}
    except UNUSABLE as exc:
        for variable, value in zip(variables, as_built):
            variable.assign(value)
        _discard(ckpt_dir, f"it cannot be restored ({one_line(exc)[:200]})", clear_unusable)
        return None
    return state | {"callback_arrays": arrays}


def restore_callbacks(stateful: list, state: dict) -> None:
    """Give every stateful callback the state it had after epoch `state['epoch']` (`state` from restore())."""
    for callback in stateful:
        name = callback.state_name
        callback.set_state(state["callbacks"][name]["state"], state["callback_arrays"][name])


def clear(ckpt_dir: str | Path) -> None:
    shutil.rmtree(ckpt_dir, ignore_errors=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the state after each completed epoch: weights and arrays first, then state.json names them.

    `stateful`: the callbacks whose state is saved too. write=False (a non-chief worker) only collects
    the history.
    """

    def __init__(self, ckpt_dir: str | Path, fingerprint: str, history: list[dict], stateful: list,
                 run_id: str | None, write: bool = True):
        super().__init__()
        self.dir, self.fingerprint, self.history = Path(ckpt_dir), fingerprint, list(history)
        self.stateful, self.run_id, self.write = stateful, run_id, write

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}})
        if not self.write:
            return
        weights = f"epoch-{epoch + 1:04d}.weights.h5"
        atomic_write(self.dir / weights, lambda tmp: self.model.save_weights(tmp))
        keep, callbacks = {weights}, {}
        for callback in self.stateful:
            state, arrays = callback.get_state()
            name = f"{callback.state_name}-{weights}.npz" if arrays is not None else None
            if name:
                atomic_write(self.dir / name, lambda tmp: np.savez(tmp, *arrays))
                keep.add(name)
            callbacks[callback.state_name] = {"state": state, "arrays": name}
        write_json(self.dir / CHECKPOINT_STATE, {
            "fingerprint": self.fingerprint,
            "epoch": epoch + 1,
            "weights": weights,
            "seed_states": [np.asarray(v).tolist() for v in _seed_states(self.model)],
            "callbacks": callbacks,
            "history": self.history,
            "mlflow_run_id": self.run_id,
        })
        for old in self.dir.glob("*epoch-*"):  # only the files state.json names stay
            if old.name not in keep:
                old.unlink(missing_ok=True)
