"""The end of the train stage (imgclf.train._save): outputs that look finished only when the run finished."""

from __future__ import annotations

import signal

import keras
import pytest

from imgclf import errors, train
from imgclf.errors import Interrupted, deferred_interrupts
from imgclf.tracking.runs import NullRun


@pytest.fixture(autouse=True)
def no_signal_left():
    yield
    errors._signals.clear()


def test_a_signal_during_the_writes_takes_the_outputs_back_and_the_run_ends_killed(tmp_path, monkeypatch):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    paths = {"model": tmp_path / "model.keras", "reports": tmp_path / "reports"}
    outputs = [paths["model"], paths["reports"] / "train.json", paths["reports"] / "run.json"]
    history = [{"epoch": 1, "loss": 1.0, "dev_loss": 1.2}]

    def save():
        with deferred_interrupts():  # as in train(): a first signal is only recorded
            train._save(model, history, {"epochs_run": 1}, {"mlflow_run_id": None}, NullRun(), paths, chief=True,
                        log_model=None)  # a NullRun logs no model

    save()
    assert all(path.is_file() for path in outputs)
    write_json = train.write_json

    def sigterm_while_writing(path, obj):  # SIGTERM lands while train.json is being written
        errors.on_interrupt_signal(signal.SIGTERM, None)
        return write_json(path, obj)

    monkeypatch.setattr(train, "write_json", sigterm_while_writing)
    with pytest.raises(Interrupted):
        save()
    assert [path.name for path in outputs if path.exists()] == []
