"""Resumable state (imgclf.training.checkpoint): one fingerprint per configuration, state.json names its files, every
stateful callback's state comes back."""

from __future__ import annotations

import copy
import json
import shutil

import keras
import numpy as np
import pytest
import yaml

from conftest import REPO
from imgclf import train
from imgclf.training import checkpoint
from imgclf.training.callbacks import CollapseDetector, Lookahead
from imgclf.training.distribute import make_strategy
from imgclf.training.early_stopping import make
from imgclf.tracking.runs import NullRun

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


def test_the_fingerprint_covers_the_code_and_the_versions_of_the_libraries_that_compute_the_weights():
    identity = checkpoint.code_identity()
    assert set(identity) == {"code", "tensorflow", "keras", "numpy"}
    base = checkpoint.fingerprint(PARAMS, "d" * 64)
    assert checkpoint.fingerprint(PARAMS, "d" * 64, identity) == base
    for key in identity:
        assert checkpoint.fingerprint(PARAMS, "d" * 64, identity | {key: "other"}) != base, key


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
    restored = checkpoint.restore(fresh, loaded, tmp_path)
    for a, b in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    again = [make("val_loss", 2), CollapseDetector(10, True), Lookahead(5, 100, 0, 0.95)]
    checkpoint.restore_callbacks(again, restored)
    assert len(again[2].ema) == 2 and all(np.all(e == 7.0) for e in again[2].ema)
    again[0].set_model(fresh)
    again[0].on_train_begin()
    assert again[0].keras_rule.best == 1.0 and again[0].keras_rule.best_weights is not None


def test_a_checkpoint_of_other_params_is_ignored_and_deleted(tmp_path, capsys):
    (tmp_path / "state.json").write_text(json.dumps({"fingerprint": "old", "weights": "epoch-0001.weights.h5"}))
    (tmp_path / "epoch-0001.weights.h5").write_text("x")
    assert checkpoint.load(tmp_path, "new", clear_stale=False) is None and tmp_path.exists()
    assert checkpoint.load(tmp_path, "new") is None and not tmp_path.exists()
    assert "belongs to other params, data or code" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null", "\udcff", '{"fingerprint": "fp", "weights": 3}'])
def test_a_state_json_that_is_not_a_checkpoints_state_is_ignored_and_deleted(tmp_path, capsys, text):
    (tmp_path / "state.json").write_bytes(text.encode(errors="surrogateescape"))
    assert checkpoint.load(tmp_path, "fp") is None and not tmp_path.exists()
    out = capsys.readouterr().out
    assert out.startswith(f"Ignoring the checkpoint in {tmp_path}:") and out.count("\n") == 1


def saved_checkpoint(ckpt_dir) -> keras.Model:
    """A checkpoint after one epoch of a compiled_model() under monitor=val_loss (weights plus best weights)."""
    model = compiled_model()
    early = make("val_loss", 2)
    early.set_model(model)
    early.on_train_begin()
    logs = {"loss": 1.0, "dev_loss": 2.0}
    early.on_epoch_end(0, logs)
    saver = checkpoint.EpochCheckpoint(ckpt_dir, "fp", [], [early], "run-1")
    saver.set_model(model)
    saver.on_epoch_end(0, logs)
    return model


def other_architecture() -> keras.Model:
    """Its first layer fits the checkpoint's (so Keras loads it), its second does not."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(2)(inputs)))
    model.compile("adam", "mse")
    return model


@pytest.mark.parametrize("damage", ["architecture", "weights file", "arrays file"])
def test_a_checkpoint_that_cannot_be_restored_leaves_the_model_as_built_and_is_deleted(tmp_path, capsys, damage):
    saved_checkpoint(tmp_path)
    if damage != "architecture":
        name = "epoch-0001.weights.h5" if damage == "weights file" else "early_stopping-epoch-0001.weights.h5.npz"
        (tmp_path / name).write_bytes(b"not what it was")
    model = other_architecture() if damage == "architecture" else compiled_model()
    model.set_weights([w + 5 for w in model.get_weights()])
    before = [v.numpy() for v in model.variables]
    state = checkpoint.load(tmp_path, "fp")
    assert checkpoint.restore(model, state, tmp_path, clear_unusable=False) is None and tmp_path.exists()
    assert checkpoint.restore(model, state, tmp_path) is None and not tmp_path.exists()
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert model.optimizer.iterations.numpy() == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"Ignoring the checkpoint in {tmp_path}: it cannot be restored (")


def test_a_val_loss_run_killed_after_its_early_stop_resumes_to_the_uninterrupted_weights(tmp_path):
    """Killed while saving: the last checkpoint is the stopping epoch's. The resumed run trains no more
    epochs and ends, like the uninterrupted one, with the best epoch's weights."""
    params = copy.deepcopy(PARAMS)
    params["model"].update(conv_blocks=[[4]], dense_units=[], input_scale=1 / 255)
    params["train"].update(training_epochs=12, batch_size=16, learning_rate=0.01, regularization_strength=0.0,
                           stop_on_collapse=False, early_stopping={"monitor": "val_loss", "patience": 1})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 64)  # random labels: the dev loss soon rises
    splits = {"train": (images[:48], labels[:48]), "dev": (images[48:], labels[48:])}

    def fit(resume):
        keras.utils.set_random_seed(params["seed"])
        model = train.build_compiled(params, 3, make_strategy("none"), splits["train"][0])
        if resume:
            resume = checkpoint.restore(model, checkpoint.load(tmp_path, "fp"), tmp_path)
            assert resume["epoch"] == 2  # the stopping epoch's checkpoint, restored
        history, summary = train.fit(model, splits, params, NullRun(), resume, tmp_path, "fp")
        return model.get_weights(), history, summary

    weights, history, summary = fit(resume=False)
    assert summary["early_stopped"] and summary["best_epoch"] < summary["stopped_epoch"] < 12
    resumed_weights, resumed_history, resumed_summary = fit(resume=True)
    assert resumed_summary == summary and resumed_history == history
    for got, want in zip(resumed_weights, weights):
        np.testing.assert_array_equal(got, want)
