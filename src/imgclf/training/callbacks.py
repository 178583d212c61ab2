"""Keras callbacks of every training run: summed epoch loss, dev metrics, timing, and the stops that are
not early stopping (a NaN loss, a signal, a collapse to one class)."""

from __future__ import annotations

import math
import sys
import time

import keras
import numpy as np

from imgclf.errors import ImgclfError, raise_if_interrupted
from imgclf.metrics import f1_macro, softmax_cross_entropy
from imgclf.tta import predict_logits


class NonFiniteLossError(ImgclfError):
    """Training produced a NaN/Inf loss; no model is written."""


class EpochLossSum(keras.callbacks.Callback):
    """Adds `loss_sum`, the sum of the epoch's per-batch mean losses: the number the report printed.

    Keras only reports a sample-weighted running mean, so the sum is rebuilt from the running
    means after the last two batches: all batches but the last hold `batch_size` samples.
    """

    def __init__(self, num_samples: int, batch_size: int):
        super().__init__()
        self.num_samples, self.batch_size = num_samples, batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._seen, self._prev = 0, (0, 0.0)  # (samples, running mean) before the latest batch
        self._last = (0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        self._prev = self._last
        self._seen = min(self._seen + self.batch_size, self.num_samples)
        self._last = (self._seen, float(logs["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        (n_prev, m_prev), (n_last, m_last) = self._prev, self._last
        full_batches = n_prev / self.batch_size
        last_batch_loss = (n_last * m_last - n_prev * m_prev) / (n_last - n_prev)
        logs["loss_sum"] = full_batches * m_prev + last_batch_loss


class DevMetrics(keras.callbacks.Callback):
    """Adds `dev_loss`, `dev_accuracy`, `dev_f1_macro` (and `dev_predicted_classes`, for the collapse
    check) from one prediction pass over the dev split.

    dev_loss includes the model's L2 term, like Keras' own val_loss, so it compares with `loss`.
    """

    def __init__(self, x_dev: np.ndarray, y_dev: np.ndarray, num_classes: int, batch_size: int):
        super().__init__()
        self.x_dev, self.y_dev = x_dev, y_dev
        self.num_classes, self.batch_size = num_classes, batch_size

    def on_epoch_end(self, epoch, logs=None):
        logits = predict_logits(self.model, self.x_dev, "none", self.batch_size)
        reg = float(sum(float(loss) for loss in self.model.losses))
        logs["dev_loss"] = softmax_cross_entropy(self.y_dev, logits) + reg
        y_pred = logits.argmax(axis=1)
        logs["dev_accuracy"] = float((y_pred == self.y_dev).mean())
        logs["dev_f1_macro"] = f1_macro(self.y_dev, y_pred, self.num_classes)
        logs["dev_predicted_classes"] = len(np.unique(y_pred))


class ProgressReport(keras.callbacks.Callback):
    """What a person watching training reads: within an epoch a bar on a terminal, else a line every
    INTERVAL seconds (a report epoch on CIFAR-10 takes minutes); after it one line with the loss, the dev scores
    and the time, instead of Keras' line of every internal value."""

    INTERVAL = 30.0

    def __init__(self, epochs: int, steps: int, terminal: bool):
        super().__init__()
        self.epochs, self.steps, self.terminal = epochs, steps, terminal

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._start, self._shown = epoch + 1, time.monotonic(), time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        head = f"Epoch {self._epoch}/{self.epochs}"
        if self.terminal and now - self._shown >= 0.2:
            done = (batch + 1) / self.steps
            print(f"\r{head} [{'=' * int(24 * done):<24}] {batch + 1}/{self.steps} ({now - self._start:.0f} s)",
                  end="", flush=True)
        elif not self.terminal and now - self._shown >= self.INTERVAL:
            print(f"{head}: {batch + 1}/{self.steps} batches ({now - self._start:.0f} s)", flush=True)
        else:
            return
        self._shown = now

    def on_epoch_end(self, epoch, logs=None):
        line = (f"Epoch {epoch + 1}/{self.epochs}: loss {logs['loss']:.4f}, dev loss {logs['dev_loss']:.4f}, "
                f"dev accuracy {logs['dev_accuracy']:.4f}, dev macro-F1 {logs['dev_f1_macro']:.4f} "
                f"({time.monotonic() - self._start:.0f} s)")
        print(("\r\033[K" if self.terminal else "") + line, flush=True)


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds`, the wall time of the epoch's training steps: first in the callback list, it ends
    before the dev pass, the checkpoint and MLflow (benchmarks/epoch_overheads.py times those apart)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_seconds"] = time.perf_counter() - self._start


class StopOnSignal(keras.callbacks.Callback):
    """Raises a SIGINT/SIGTERM that arrived during training, at the next batch boundary: in our own
    code, between steps, so the checkpoint is intact and the run ends KILLED (see errors.py)."""

    def on_train_batch_end(self, batch, logs=None):
        raise_if_interrupted()

    def on_epoch_end(self, epoch, logs=None):
        raise_if_interrupted()


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first NaN/Inf batch loss with a clear error (Keras' TerminateOnNaN stops silently)."""

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} at epoch batch {batch + 1}; "
                "lower train.learning_rate or check the input data and model.input_scale"
            )


def one_class_f1(y_dev: np.ndarray, num_classes: int) -> float:
    """The dev macro-F1 of the best one-class predictor: predicting class c for every image scores
    F1 2p/(1 + p) on c (p its share of the dev images) and 0 on every other class."""
    share = np.bincount(y_dev, minlength=num_classes) / len(y_dev)
    return float((2 * share / (1 + share)).max() / num_classes)


class CollapseDetector(keras.callbacks.Callback):
    """Catches a net that predicts a single class: after epoch AFTER_EPOCH, IN_A_ROW epochs in a row whose
    dev predictions are one class or whose dev macro-F1 is at most halfway from what one class scores on
    these dev labels (`one_class_f1`: 0.018 on balanced 10 classes, 0.333 on 2) to guessing's 1 / classes.

    Measured from the one-class score, not as a share of 1 / classes: with few classes a healthy run sits
    near 1.5 / classes (0.70 dev F1 on cats and dogs), while a one-class net is far below guessing whatever
    the number of classes. y_dev None: balanced classes.

    Then it prints one WARNING line and (train.stop_on_collapse) stops training; the run is tagged and
    reported collapsed. The report's L2 on raw pixels sits on this knife edge: seed 51 collapsed under a
    GPU's TF32 matmuls and learned in full float32.
    """

    state_name = "collapse"
    AFTER_EPOCH = 3
    IN_A_ROW = 3

    def __init__(self, num_classes: int, stop: bool, y_dev: np.ndarray | None = None):
        super().__init__()
        labels = np.arange(num_classes) if y_dev is None else np.asarray(y_dev)
        self.one_class, self.guessing = one_class_f1(labels, num_classes), 1 / num_classes
        self.threshold, self.stop = (self.one_class + self.guessing) / 2, stop
        self.streak, self.collapsed_epoch = 0, 0

    def on_epoch_end(self, epoch, logs=None):
        one_class = logs["dev_predicted_classes"] == 1 or logs["dev_f1_macro"] <= self.threshold
        self.streak = self.streak + 1 if one_class and epoch + 1 > self.AFTER_EPOCH else 0
        if self.streak < self.IN_A_ROW or self.collapsed_epoch:
            return
        self.collapsed_epoch = epoch + 1
        then = "stopping training (stop_reason: collapsed); the model is still saved and evaluated" if self.stop \
            else "training goes on (train.stop_on_collapse: false)"
        print(f"WARNING: training collapsed to one class: dev predictions were {int(logs['dev_predicted_classes'])} "
              f"class(es), dev macro-F1 {logs['dev_f1_macro']:.3f} (<= {self.threshold:.3f}: one class scores "
              f"{self.one_class:.3f} on these dev labels, guessing {self.guessing:.3f}) for epochs "
              f"{epoch + 2 - self.IN_A_ROW}-{epoch + 1}; {then}. Try another seed, train.tf32=false on a GPU, "
              "or model.input_scale=0.00392156862745098 (inputs in [0, 1])", file=sys.stderr, flush=True)
        if self.stop:
            self.model.stop_training = True

    def summary(self) -> dict:
        return {"collapsed": self.collapsed_epoch > 0, "collapsed_epoch": self.collapsed_epoch}

    def get_state(self) -> tuple[dict, None]:
        return {"streak": self.streak, "collapsed_epoch": self.collapsed_epoch}, None

    def set_state(self, state: dict, arrays: None) -> None:
        self.streak, self.collapsed_epoch = state["streak"], state["collapsed_epoch"]


class Lookahead(keras.callbacks.Callback):
    """Lookahead/EMA of every float weight, BN running statistics included (airbench94).

    Every `every` steps after step `start`: ema <- ema + (1 - rho) (net - ema), then net <- ema, with
    rho = decay**every * (step / total)**3, so the averaging tightens towards the end. After the last
    step the net takes the average. The averaged weights are checkpointed (state_name "lookahead").
    """

    state_name = "lookahead"

    def __init__(self, every: int, total_steps: int, start: int, decay: float):
        super().__init__()
        self.every, self.total, self.start, self.decay = every, total_steps, start, decay
        self.ema: list[np.ndarray] | None = None

    def _variables(self) -> list:
        return [v for v in self.model.weights if "float" in str(v.dtype)]

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step <= self.start or (step % self.every and step < self.total):
            return
        variables = self._variables()
        if self.ema is None:
            self.ema = [np.array(v.numpy()) for v in variables]
        if step % self.every == 0:
            rho = self.decay ** self.every * (step / self.total) ** 3
            for ema, variable in zip(self.ema, variables):
                ema += (1 - rho) * (variable.numpy() - ema)
        for ema, variable in zip(self.ema, variables):
            variable.assign(ema)

    def get_state(self) -> tuple[dict, list | None]:
        return {"started": self.ema is not None}, self.ema

    def set_state(self, state: dict, arrays: list | None) -> None:
        self.ema = [np.array(a) for a in arrays] if arrays is not None else None
