"""Early stopping (imgclf.training.early_stopping): the report's rule on hand-written loss sequences, Keras' rule,
no rule, all behind one interface, and their checkpointed state."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from imgclf.training import early_stopping
from imgclf.config import MONITORS
from imgclf.training.early_stopping import ReportEarlyStopping


def stop_epoch(losses, patience):
    """1-based epoch at which the report's rule stops, or None."""
    rule = ReportEarlyStopping(patience)
    for epoch, loss in enumerate(losses, start=1):
        if rule.validate(loss):
            return epoch, rule
    return None, rule


@pytest.mark.parametrize("losses, patience, expected_stop, expected_best", [
    ([5, 4, 3, 2, 1], 0, None, 5),
    ([5, 6], 0, 2, 1),                       # one worse epoch exceeds patience 0
    ([5, 6, 7], 1, 3, 1),                    # counter 1, then 2 > 1
    ([5, 6, 4, 5, 6], 1, 5, 3),              # improvement resets the counter
    ([5, 5, 5, 5, 5, 5, 5, 5], 0, None, 8),  # equal is not worse: best moves, counter resets
    ([3372, 444, 382, 332, 295, 254, 210, 175, 143, 127, 113, 98, 86, 92, 75], 5, None, 15),  # report's run
    ([10, 11, 12, 13, 14, 15, 16], 5, 7, 1),  # six worse epochs in a row > patience 5
])
def test_report_rule(losses, patience, expected_stop, expected_best):
    stopped, rule = stop_epoch(losses, patience)
    assert stopped == expected_stop
    assert rule.best_epoch == expected_best


def test_report_rule_counter_values():
    rule = ReportEarlyStopping(patience=5)
    waits = []
    for loss in [468.0, 466.0, 470.0, 469.0, 466.0, 467.0]:
        rule.validate(loss)
        waits.append(rule.wait)
    assert waits == [0, 0, 1, 2, 0, 1]  # 466.0 equals the best: counter resets
    assert rule.best == 466.0 and rule.best_epoch == 5


class Feed(keras.callbacks.Callback):
    """Adds the next of `values` to each epoch's logs under `key`: stands in for EpochLossSum or DevMetrics
    with a crafted sequence."""

    def __init__(self, key: str, values: list[float]):
        super().__init__()
        self.key, self.values = key, iter(values)

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = next(self.values)


def tiny_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_early_stop_logger_stops_fit_on_the_reports_rule():
    model = tiny_model()
    feed = Feed("loss_sum", [5.0, 4.0, 6.0, 7.0, 8.0, 9.0])

    early = early_stopping.make("loss", patience=2)
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    history = model.fit(x, y, epochs=6, verbose=0, callbacks=[feed, early])
    assert len(history.history["loss"]) == 5  # 6 > 4 (1), 7 (2), 8 (3 > 2): stop after epoch 5
    assert history.history["early_stopping_wait"] == [0, 0, 1, 2, 3]
    assert early.summary() == {"monitor": "loss", "patience": 2, "early_stopped": True, "stopped_epoch": 5,
                               "best_epoch": 2, "best_loss": 4.0}


def test_early_stop_logger_val_loss_restores_best_weights():
    model = tiny_model()
    weights_at = {}

    class RecordWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            weights_at[epoch + 1] = model.get_weights()

    early = early_stopping.make("val_loss", patience=2)
    x, y = np.ones((8, 4), np.float32), np.ones(8, np.int64)
    model.fit(x, y, epochs=5, verbose=0, callbacks=[Feed("dev_loss", [3.0, 2.0, 2.5, 2.6, 2.7]), RecordWeights(), early])
    summary = early.summary()
    assert summary["early_stopped"] and summary["stopped_epoch"] == 4 and summary["best_epoch"] == 2
    assert summary["best_loss"] == 2.0
    for restored, best in zip(model.get_weights(), weights_at[2]):
        np.testing.assert_array_equal(restored, best)


def test_the_keras_rule_resumed_after_its_stop_knows_it_stopped_and_ends_with_the_best_weights():
    """Killed while saving, after the stop: the last checkpoint is the stopping epoch's. Its state says the
    rule stopped before fit() begins (train.fit then trains nothing) and on_train_end alone (what fit() ends
    with) puts the best epoch's weights back, as the uninterrupted run did."""
    model = tiny_model()
    saved = {}

    class Checkpoint(keras.callbacks.Callback):  # what checkpoint.EpochCheckpoint keeps after each epoch
        def on_epoch_end(self, epoch, logs=None):
            saved.update(state=early.get_state(), weights=model.get_weights())

    early = early_stopping.make("val_loss", patience=2)
    x, y = np.ones((8, 4), np.float32), np.ones(8, np.int64)
    model.fit(x, y, epochs=5, verbose=0, callbacks=[Feed("dev_loss", [3.0, 2.0, 2.5, 2.6, 2.7]), early, Checkpoint()])
    resumed, killed = early_stopping.make("val_loss", patience=2), tiny_model()
    resumed.set_state(*saved["state"])
    killed.set_weights(saved["weights"])
    assert resumed.stopped_epoch == 4 and resumed.summary() == early.summary()
    resumed.set_model(killed)
    resumed.on_train_end()
    for got, want in zip(killed.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_config_offers_exactly_the_rules_there_are():
    assert set(MONITORS) == set(early_stopping.RULES)


def test_monitor_none_never_stops_but_names_the_best_epoch():
    model = tiny_model()
    feed = Feed("loss_sum", [5.0, 4.0, 6.0, 7.0, 8.0, 9.0])

    early = early_stopping.make("none", patience=0)
    history = model.fit(np.zeros((8, 4), np.float32), np.zeros(8, np.int64), epochs=6, verbose=0,
                        callbacks=[feed, early])
    assert len(history.history["loss"]) == 6 and history.history["early_stopping_wait"] == [0, 0, 1, 2, 3, 4]
    assert early.summary() == {"monitor": "none", "patience": 0, "early_stopped": False, "stopped_epoch": 0,
                               "best_epoch": 2, "best_loss": 4.0}


@pytest.mark.parametrize("monitor", ["loss", "none"])
def test_the_reports_rule_resumes_from_its_checkpointed_state(monitor):
    """Three epochs, then a fresh rule from the saved state, then three more: the same as six at once."""
    losses = [5.0, 4.0, 6.0, 7.0, 3.0, 8.0]

    def run(rule, values, first):
        for epoch, value in enumerate(values, start=first):
            logs = {"loss_sum": value}
            rule.should_stop(epoch, logs)
        return rule

    whole = run(early_stopping.make(monitor, 5), losses, 0)
    state, arrays = run(early_stopping.make(monitor, 5), losses[:3], 0).get_state()
    resumed = early_stopping.make(monitor, 5)
    resumed.set_state(state, arrays)
    assert run(resumed, losses[3:], 3).summary() == whole.summary() and resumed.get_state() == whole.get_state()
