"""Resumable training: after every epoch, everything needed to continue bit-identically.

A checkpoint is `state.json` plus the files it names: the weights file (model + optimizer variables,
Keras' `save_weights`, so the step count that drives a learning-rate schedule too) and one `.npz` per
stateful callback that has arrays (Keras' best weights under monitor=val_loss, the fast family's
lookahead weights). Keras does not save the dropout layers' RNG state, so state.json records it;
the data order and augmentation need no state because they are derived from (seed, epoch, index).
A checkpoint belongs to one fingerprint (seed, model, train params and the prepared data's digest):
any other configuration ignores it and starts afresh.

A stateful callback has a `state_name` and `get_state() -> (dict, arrays or None)` /
`set_state(dict, arrays or None)`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import keras
import numpy as np

from imgclf.files import atomic_write, write_json
from imgclf.paths import CHECKPOINT_STATE


def fingerprint(params: dict, data_digest: str) -> str:
    """What must match for a checkpoint to be resumed: the training params and the data."""
    key = {k: params[k] for k in ("seed", "model", "train")} | {"data_digest": data_digest}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _seed_states(model: keras.Model) -> list:
    """The dropout layers' SeedGenerator state variables, in a stable order."""
    return [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]


def load(ckpt_dir: str | Path, expected_fingerprint: str, clear_stale: bool = True) -> dict | None:
    """The saved state if it exists and matches this configuration, else None (a stale one is deleted
    when clear_stale: only the process that writes checkpoints may delete one)."""
    path = Path(ckpt_dir) / CHECKPOINT_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        state = {}
    if state.get("fingerprint") != expected_fingerprint or not (Path(ckpt_dir) / state.get("weights", "")).is_file():
        print(f"Ignoring the checkpoint in {ckpt_dir}: it belongs to other params or data; starting afresh.")
        if clear_stale:
            clear(ckpt_dir)
        return None
    return state


def restore(model: keras.Model, state: dict, ckpt_dir: str | Path) -> None:
    """Load weights, optimizer variables and dropout RNG state saved after epoch `state['epoch']`."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(Path(ckpt_dir) / state["weights"])
    for variable, value in zip(_seed_states(model), state["seed_states"]):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def restore_callbacks(stateful: list, state: dict, ckpt_dir: str | Path) -> None:
    """Give every stateful callback the state it had after epoch `state['epoch']`."""
    for callback in stateful:
        saved, arrays = state["callbacks"][callback.state_name], None
        if saved.get("arrays"):
            with np.load(Path(ckpt_dir) / saved["arrays"]) as npz:
                arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        callback.set_state(saved["state"], arrays)


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
