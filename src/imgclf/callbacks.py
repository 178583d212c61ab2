"""Keras callbacks for the report's training loop: summed epoch loss, its early stop, dev metrics."""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from imgclf.io import ImgclfError, raise_if_interrupted
from imgclf.metrics import f1_macro, softmax_cross_entropy


# What these callbacks add to Keras' per-epoch logs, in the order history.csv and MLflow show them.
EPOCH_METRICS = ("loss", "loss_sum", "accuracy", "dev_loss", "dev_accuracy", "dev_f1_macro",
                 "early_stopping_wait", "epoch_seconds")


class NonFiniteLossError(ImgclfError):
    """Training produced a NaN/Inf loss; no model is written."""


class ReportEarlyStopping:
    """The report's EarlyStopping class: a loss greater than the best so far counts up, else resets.

    Equal is not worse. `validate` returns True (stop) once the counter exceeds `patience`.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best = math.inf
        self.wait = 0
        self.best_epoch = 0
        self.epochs_seen = 0

    def validate(self, loss: float) -> bool:
        self.epochs_seen += 1
        if self.best < loss:
            self.wait += 1
            return self.wait > self.patience
        self.best, self.wait, self.best_epoch = loss, 0, self.epochs_seen
        return False


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
    """Adds `dev_loss`, `dev_accuracy` and `dev_f1_macro` from one prediction pass over the dev split.

    dev_loss includes the L2 term, like Keras' own val_loss, so it compares with `loss`.
    """

    def __init__(self, x_dev: np.ndarray, y_dev: np.ndarray, num_classes: int, batch_size: int):
        super().__init__()
        self.x_dev, self.y_dev = x_dev, y_dev
        self.num_classes, self.batch_size = num_classes, batch_size

    def on_epoch_end(self, epoch, logs=None):
        logits = self.model.predict(self.x_dev, batch_size=self.batch_size, verbose=0)
        reg = float(sum(float(loss) for loss in self.model.losses))
        logs["dev_loss"] = softmax_cross_entropy(self.y_dev, logits) + reg
        y_pred = logits.argmax(axis=1)
        logs["dev_accuracy"] = float((y_pred == self.y_dev).mean())
        logs["dev_f1_macro"] = f1_macro(self.y_dev, y_pred, self.num_classes)


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds`, the wall time of the epoch's training and dev pass."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_seconds"] = time.perf_counter() - self._start


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first NaN/Inf batch loss with a clear error (Keras' TerminateOnNaN stops silently),
    and at the first batch after a SIGINT/SIGTERM whose exception something swallowed."""

    def on_train_batch_end(self, batch, logs=None):
        raise_if_interrupted()
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} at epoch batch {batch + 1}; "
                "lower train.learning_rate or check the input data and model.input_scale"
            )


class EarlyStopLogger(keras.callbacks.Callback):
    """Runs the early-stop rule on every epoch, adds `early_stopping_wait` and stops training.

    monitor=loss uses the report's rule on `loss_sum`; monitor=val_loss uses Keras'
    EarlyStopping on `dev_loss` with restore_best_weights. Both record best and stopped epochs.
    """

    def __init__(self, monitor: str, patience: int):
        super().__init__()
        self.monitor, self.patience = monitor, patience
        self.rule = ReportEarlyStopping(patience) if monitor == "loss" else None
        self.keras_rule = None if self.rule else keras.callbacks.EarlyStopping(
            monitor="dev_loss", patience=patience, restore_best_weights=True, mode="min"
        )
        self.stopped_epoch = 0
        self._resumed: tuple | None = None

    def set_model(self, model):
        super().set_model(model)
        if self.keras_rule:
            self.keras_rule.set_model(model)

    def on_train_begin(self, logs=None):
        if self.keras_rule:
            self.keras_rule.on_train_begin(logs)  # resets Keras' counters: resumed state goes on top
        if self._resumed:
            self._apply_state(*self._resumed)

    def get_state(self) -> tuple[dict, list | None]:
        """JSON-able counters for a checkpoint, plus Keras' best weights (val_loss) or None."""
        rule = self.rule or self.keras_rule
        state = {"stopped_epoch": self.stopped_epoch, "wait": rule.wait, "best": rule.best,
                 "best_epoch": rule.best_epoch, "epochs_seen": getattr(rule, "epochs_seen", 0)}
        return state, (self.keras_rule.best_weights if self.keras_rule else None)

    def set_state(self, state: dict, best_weights: list | None) -> None:
        """Continue from a checkpoint's counters (applied when fit() begins)."""
        self._resumed = (state, best_weights)

    def _apply_state(self, state: dict, best_weights: list | None) -> None:
        rule = self.rule or self.keras_rule
        self.stopped_epoch = state["stopped_epoch"]
        rule.wait, rule.best, rule.best_epoch = state["wait"], state["best"], state["best_epoch"]
        if self.rule:
            self.rule.epochs_seen = state["epochs_seen"]
        else:
            self.keras_rule.best_weights = best_weights

    def on_epoch_end(self, epoch, logs=None):
        if self.rule:
            stop = self.rule.validate(logs["loss_sum"])
            logs["early_stopping_wait"] = self.rule.wait
        else:
            self.keras_rule.on_epoch_end(epoch, logs)
            stop = self.model.stop_training
            logs["early_stopping_wait"] = self.keras_rule.wait
        if stop:
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.keras_rule:
            self.keras_rule.on_train_end(logs)

    def summary(self) -> dict:
        """Early-stop facts for train.json and MLflow (epochs are 1-based)."""
        if self.rule:
            best_epoch, best = self.rule.best_epoch, self.rule.best
        else:
            best_epoch, best = self.keras_rule.best_epoch + 1, self.keras_rule.best
        return {
            "monitor": self.monitor,
            "patience": self.patience,
            "early_stopped": self.stopped_epoch > 0,
            "stopped_epoch": self.stopped_epoch,
            "best_epoch": best_epoch,
            "best_loss": float(best),
        }
