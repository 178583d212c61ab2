"""The report's early stop on hand-written loss sequences, the summed epoch loss, NaN stops."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from imgclf.callbacks import (EarlyStopLogger, EpochLossSum, NonFiniteLossError, ReportEarlyStopping,
                              StopOnNonFiniteLoss)


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


def simulate_keras_running_means(batch_losses, sizes):
    """What Keras passes to on_train_batch_end: the sample-weighted running mean of batch losses."""
    total, count = 0.0, 0
    for loss, size in zip(batch_losses, sizes):
        total, count = total + loss * size, count + size
        yield np.float32(total / count)


@pytest.mark.parametrize("n, batch", [(1000, 128), (1024, 128), (100, 128), (129, 128)])
def test_epoch_loss_sum_rebuilds_the_reports_sum(n, batch):
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    losses = list(np.random.default_rng(n).uniform(0.5, 3.0, len(sizes)))
    cb = EpochLossSum(n, batch)
    cb.on_epoch_begin(0)
    for step, mean in enumerate(simulate_keras_running_means(losses, sizes)):
        cb.on_train_batch_end(step, {"loss": mean})
    logs = {}
    cb.on_epoch_end(0, logs)
    assert logs["loss_sum"] == pytest.approx(sum(losses), rel=1e-5)


def tiny_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_early_stop_logger_stops_fit_on_the_reports_rule():
    model = tiny_model()
    sequence = iter([5.0, 4.0, 6.0, 7.0, 8.0, 9.0])

    class FeedLossSum(keras.callbacks.Callback):  # stands in for EpochLossSum with a crafted sequence
        def on_epoch_end(self, epoch, logs=None):
            logs["loss_sum"] = next(sequence)

    early = EarlyStopLogger("loss", patience=2)
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    history = model.fit(x, y, epochs=6, verbose=0, callbacks=[FeedLossSum(), early])
    assert len(history.history["loss"]) == 5  # 6 > 4 (1), 7 (2), 8 (3 > 2): stop after epoch 5
    assert history.history["early_stopping_wait"] == [0, 0, 1, 2, 3]
    assert early.summary() == {"monitor": "loss", "patience": 2, "early_stopped": True, "stopped_epoch": 5,
                               "best_epoch": 2, "best_loss": 4.0}


def test_early_stop_logger_val_loss_restores_best_weights():
    model = tiny_model()
    sequence = iter([3.0, 2.0, 2.5, 2.6, 2.7])
    weights_at = {}

    class FeedDevLoss(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["dev_loss"] = next(sequence)
            weights_at[epoch + 1] = model.get_weights()

    early = EarlyStopLogger("val_loss", patience=2)
    x, y = np.ones((8, 4), np.float32), np.ones(8, np.int64)
    model.fit(x, y, epochs=5, verbose=0, callbacks=[FeedDevLoss(), early])
    summary = early.summary()
    assert summary["early_stopped"] and summary["stopped_epoch"] == 4 and summary["best_epoch"] == 2
    assert summary["best_loss"] == 2.0
    for restored, best in zip(model.get_weights(), weights_at[2]):
        np.testing.assert_array_equal(restored, best)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_raises_a_clear_error(bad):
    with pytest.raises(NonFiniteLossError, match="lower train.learning_rate"):
        StopOnNonFiniteLoss().on_train_batch_end(0, {"loss": bad})


def test_a_swallowed_interrupt_still_stops_training_at_the_next_batch():
    import signal

    from imgclf import io
    from imgclf.io import Interrupted, on_interrupt_signal

    try:
        try:
            on_interrupt_signal(signal.SIGTERM, None)
        except Interrupted:
            pass  # what a finalizer or a broad `except` in a library would do
        with pytest.raises(Interrupted):
            StopOnNonFiniteLoss().on_train_batch_end(0, {"loss": 1.0})
    finally:
        io._signalled.clear()
    StopOnNonFiniteLoss().on_train_batch_end(0, {"loss": 1.0})  # no signal: nothing raised
