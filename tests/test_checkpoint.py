"""Resumable state (imgclf.checkpoint): one fingerprint per configuration, state.json names its files, every
stateful callback's state comes back."""

from __future__ import annotations

import copy
import json

import keras
import numpy as np
import yaml

from conftest import REPO
from imgclf import checkpoint
from imgclf.callbacks import CollapseDetector, Lookahead
from imgclf.early_stopping import make

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_fingerprint_covers_seed_model_train_and_data_but_not_tracking():
    base = checkpoint.fingerprint(PARAMS, "d" * 64)
    changed = []
    for section, key, value in (("train", "batch_size", 64), ("model", "arch", "fast"), ("seed", None, 7)):
        params = copy.deepcopy(PARAMS)
        if key:
            params[section][key] = value
        else:
            params[section] = value
        changed.append(checkpoint.fingerprint(params, "d" * 64))
    other = copy.deepcopy(PARAMS)
    other["tracking"]["experiment"] = "elsewhere"
    assert base not in changed and checkpoint.fingerprint(PARAMS, "e" * 64) != base
    assert checkpoint.fingerprint(other, "d" * 64) == base


def compiled_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("adam", "mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_every_epoch_saves_weights_and_callback_states_and_keeps_only_the_latest(tmp_path):
    model = compiled_model()
    early, collapse = make("val_loss", 2), CollapseDetector(10, True)
    lookahead = Lookahead(every=5, total_steps=100, start=0, decay=0.95)
    for callback in (early, collapse, lookahead):
        callback.set_model(model)
    early.on_train_begin()
    lookahead.ema = [np.full(w.shape, 7.0, np.float32) for w in model.get_weights()]
    saver = checkpoint.EpochCheckpoint(tmp_path, "fp", [], [early, collapse, lookahead], "run-1")
    saver.set_model(model)
    model.stop_training = False
    for epoch in range(2):
        logs = {"loss": 1.0, "dev_loss": 2.0 - epoch, "dev_f1_macro": 0.5, "dev_predicted_classes": 3}
        early.on_epoch_end(epoch, logs)
        collapse.on_epoch_end(epoch, logs)
        saver.on_epoch_end(epoch, logs)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 2 and state["mlflow_run_id"] == "run-1" and len(state["history"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "early_stopping-epoch-0002.weights.h5.npz", "epoch-0002.weights.h5",
        "lookahead-epoch-0002.weights.h5.npz", "state.json"]
    assert state["callbacks"]["collapse"] == {"state": {"streak": 0, "collapsed_epoch": 0}, "arrays": None}

    loaded = checkpoint.load(tmp_path, "fp")
    fresh = compiled_model()
    checkpoint.restore(fresh, loaded, tmp_path)
    for a, b in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    again = [make("val_loss", 2), CollapseDetector(10, True), Lookahead(5, 100, 0, 0.95)]
    checkpoint.restore_callbacks(again, loaded, tmp_path)
    assert len(again[2].ema) == 2 and all(np.all(e == 7.0) for e in again[2].ema)
    again[0].set_model(fresh)
    again[0].on_train_begin()
    assert again[0].keras_rule.best == 1.0 and again[0].keras_rule.best_weights is not None


def test_a_checkpoint_of_other_params_is_ignored_and_deleted(tmp_path, capsys):
    (tmp_path / "state.json").write_text(json.dumps({"fingerprint": "old", "weights": "epoch-0001.weights.h5"}))
    (tmp_path / "epoch-0001.weights.h5").write_text("x")
    assert checkpoint.load(tmp_path, "new", clear_stale=False) is None and tmp_path.exists()
    assert checkpoint.load(tmp_path, "new") is None and not tmp_path.exists()
    assert "belongs to other params or data" in capsys.readouterr().out
