"""Training callbacks (imgclf.training.callbacks): the report's summed epoch loss, NaN stops, the collapse detector
and the lookahead of the fast family."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from imgclf.training.callbacks import (CollapseDetector, EpochLossSum, Lookahead, NonFiniteLossError, StopOnNonFiniteLoss,
                              one_class_f1)
from imgclf.metrics import f1_macro


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




def balanced(num_classes: int, per_class: int = 30) -> np.ndarray:
    """Dev labels with `per_class` images of every class."""
    return np.repeat(np.arange(num_classes), per_class)


def collapse_run(f1s, classes, stop=True, num_classes=10, y_dev=None):
    """Feed per-epoch dev macro-F1 and predicted-class counts to a detector; returns it and the epochs run."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    detector = CollapseDetector(num_classes, stop, balanced(num_classes) if y_dev is None else y_dev)
    detector.set_model(model)
    model.stop_training = False  # what fit() sets before the first epoch
    for epoch, (f1, n) in enumerate(zip(f1s, classes)):
        detector.on_epoch_end(epoch, {"dev_f1_macro": f1, "dev_predicted_classes": n})
        if model.stop_training:
            return detector, epoch + 1
    return detector, len(f1s)


@pytest.mark.parametrize("y_dev, expected", [
    (balanced(10, 18), 2 * 0.1 / 1.1 / 10),  # ~0.018: the report's collapse on CIFAR-10
    (balanced(2), 1 / 3),
    (balanced(3), 1 / 6),
    (np.array([0] * 90 + [1] * 10), 2 * 0.9 / 1.9 / 2),  # the majority class scores best
])
def test_the_one_class_score_is_what_predicting_one_class_scores_on_these_labels(y_dev, expected):
    num_classes = int(y_dev.max()) + 1
    assert one_class_f1(y_dev, num_classes) == pytest.approx(expected)
    by_sklearn = max(f1_macro(y_dev, np.full_like(y_dev, c), num_classes) for c in range(num_classes))
    assert one_class_f1(y_dev, num_classes) == pytest.approx(by_sklearn, rel=1e-12)


def test_collapse_is_three_one_class_epochs_in_a_row_after_epoch_3(capsys):
    detector, ran = collapse_run([0.018] * 10, [1] * 10)
    assert ran == 6 and detector.summary() == {"collapsed": True, "collapsed_epoch": 6}
    line = capsys.readouterr().err.strip()
    assert line.startswith("WARNING: training collapsed to one class") and "\n" not in line
    assert "epochs 4-6" in line and "stop_reason: collapsed" in line and "train.tf32=false" in line
    assert "another seed" in line and "model.input_scale" in line
    assert "dev macro-F1 0.018 (<= 0.059: one class scores 0.018 on these dev labels, guessing 0.100)" in line


@pytest.mark.parametrize("num_classes, f1", [(2, 1 / 3), (3, 1 / 6), (10, 0.018)])
def test_a_one_class_run_is_flagged_whatever_the_number_of_classes(num_classes, f1):
    detector, ran = collapse_run([f1] * 8, [1] * 8, num_classes=num_classes)
    assert ran == 6 and detector.summary() == {"collapsed": True, "collapsed_epoch": 6}


@pytest.mark.parametrize("f1s, classes, num_classes", [
    ([0.018, 0.018, 0.5, 0.018, 0.018, 0.6, 0.018, 0.018, 0.7], [1, 1, 5, 1, 1, 6, 1, 1, 7], 10),  # never 3 in a row
    ([0.9] * 9, [10] * 9, 10),
    ([0.16] * 9, [2] * 9, 10),  # above the old 1.5 / 10 with two classes predicted
    ([0.08] * 9, [4] * 9, 10),  # weak, but scoring above halfway from one class (0.018) to guessing (0.1)
    ([0.59, 0.63, 0.38, 0.67, 0.70, 0.70, 0.72, 0.71, 0.74], [2] * 9, 2),  # the reproduced healthy cat/dog run
    ([0.45] * 9, [2] * 9, 2),  # below the old 1.5 / 2 = 0.75 for nine epochs: still better than one class
    ([0.30, 0.35, 0.40, 0.45, 0.48, 0.50, 0.55, 0.58, 0.60], [3] * 9, 3),  # below the old 1.5 / 3 = 0.5
])
def test_no_collapse_without_three_bad_epochs_in_a_row(f1s, classes, num_classes, capsys):
    detector, ran = collapse_run(f1s, classes, num_classes=num_classes)
    assert ran == 9 and detector.summary() == {"collapsed": False, "collapsed_epoch": 0}
    assert capsys.readouterr().err == ""


def test_low_f1_counts_as_collapse_and_stop_on_collapse_false_only_warns(capsys):
    detector, ran = collapse_run([0.03] * 8, [3] * 8, stop=False)  # three classes predicted, barely above one's
    assert ran == 8 and detector.summary() == {"collapsed": True, "collapsed_epoch": 6}
    assert "training goes on (train.stop_on_collapse: false)" in capsys.readouterr().err
    resumed = CollapseDetector(10, False, balanced(10))
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
