"""Training callbacks (imgclf.callbacks): the report's summed epoch loss, NaN stops, the collapse detector
and the lookahead of the fast family."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from imgclf.callbacks import CollapseDetector, EpochLossSum, Lookahead, NonFiniteLossError, StopOnNonFiniteLoss


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


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_raises_a_clear_error(bad):
    with pytest.raises(NonFiniteLossError, match="lower train.learning_rate"):
        StopOnNonFiniteLoss().on_train_batch_end(0, {"loss": bad})




def collapse_run(f1s, classes, stop=True, num_classes=10):
    """Feed per-epoch dev macro-F1 and predicted-class counts to a detector; returns it and the epochs run."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    detector = CollapseDetector(num_classes, stop)
    detector.set_model(model)
    model.stop_training = False  # what fit() sets before the first epoch
    for epoch, (f1, n) in enumerate(zip(f1s, classes)):
        detector.on_epoch_end(epoch, {"dev_f1_macro": f1, "dev_predicted_classes": n})
        if model.stop_training:
            return detector, epoch + 1
    return detector, len(f1s)


def test_collapse_is_three_one_class_epochs_in_a_row_after_epoch_3(capsys):
    detector, ran = collapse_run([0.018] * 10, [1] * 10)
    assert ran == 6 and detector.summary() == {"collapsed": True, "collapsed_epoch": 6}
    line = capsys.readouterr().err.strip()
    assert line.startswith("WARNING: training collapsed to one class") and "\n" not in line
    assert "epochs 4-6" in line and "stop_reason: collapsed" in line and "train.tf32=false" in line
    assert "another seed" in line and "model.input_scale" in line


@pytest.mark.parametrize("f1s, classes", [
    ([0.018, 0.018, 0.5, 0.018, 0.018, 0.6, 0.018, 0.018, 0.7], [1, 1, 5, 1, 1, 6, 1, 1, 7]),  # never 3 in a row
    ([0.9] * 9, [10] * 9),
    ([0.16] * 9, [2] * 9),  # just above 1.5 / 10 with two classes predicted
])
def test_no_collapse_without_three_bad_epochs_in_a_row(f1s, classes, capsys):
    detector, ran = collapse_run(f1s, classes)
    assert ran == 9 and detector.summary() == {"collapsed": False, "collapsed_epoch": 0}
    assert capsys.readouterr().err == ""


def test_low_f1_counts_as_collapse_and_stop_on_collapse_false_only_warns(capsys):
    detector, ran = collapse_run([0.15] * 8, [3] * 8, stop=False)  # 0.15 <= 1.5 / 10 with three classes
    assert ran == 8 and detector.summary() == {"collapsed": True, "collapsed_epoch": 6}
    assert "training goes on (train.stop_on_collapse: false)" in capsys.readouterr().err
    resumed = CollapseDetector(10, False)
    resumed.set_state(*detector.get_state())
    assert resumed.summary() == detector.summary()


def test_lookahead_averages_weights_and_bn_statistics_on_its_schedule():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    model.compile("sgd", "mse")
    model.optimizer.build(model.trainable_variables)
    lookahead = Lookahead(every=5, total_steps=10, start=2, decay=0.95)
    lookahead.set_model(model)

    def at_step(step, weights=None):
        if weights is not None:
            model.set_weights(weights)
        model.optimizer.iterations.assign(step)
        lookahead.on_train_batch_end(0)
        return model.get_weights()

    w0 = [np.full(w.shape, 1.0, np.float32) for w in model.get_weights()]
    w1 = [np.full(w.shape, 3.0, np.float32) for w in model.get_weights()]
    assert lookahead.get_state() == ({"started": False}, None)
    at_step(2, w0)  # not after `start`: nothing happens
    assert lookahead.ema is None
    for got, want in zip(at_step(5, w0), w0):  # first sync: the average starts as the net
        np.testing.assert_array_equal(got, want)
    for got, want in zip(at_step(7, w1), w1):  # between syncs the net trains freely
        np.testing.assert_array_equal(got, want)
    rho = 0.95 ** 5 * (10 / 10) ** 3
    after = at_step(10, w1)  # the last step is a sync: lerp, then the net takes the average
    assert len(after) == len(model.weights) == 6  # kernel, bias, BN gamma, beta, moving mean and variance
    for got in model.get_weights():
        np.testing.assert_allclose(got, 1.0 + (1 - rho) * (3.0 - 1.0), rtol=1e-6)
    state, arrays = lookahead.get_state()
    assert state == {"started": True} and len(arrays) == len(model.weights)


def test_lookahead_hands_the_average_to_the_net_after_the_last_step_between_syncs():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.optimizer.build(model.trainable_variables)
    lookahead = Lookahead(every=5, total_steps=7, start=0, decay=0.95)
    lookahead.set_model(model)
    model.set_weights([np.ones((1, 1), np.float32), np.ones(1, np.float32)])
    model.optimizer.iterations.assign(5)
    lookahead.on_train_batch_end(0)
    model.set_weights([np.full((1, 1), 9.0, np.float32), np.full(1, 9.0, np.float32)])
    model.optimizer.iterations.assign(7)  # the last step, no sync: the net goes back to the average
    lookahead.on_train_batch_end(0)
    assert [w.item() for w in model.get_weights()] == [1.0, 1.0]
