"""Early stopping, chosen once by `train.early_stopping.monitor`: one callback per rule, one interface.

loss      the report's rule on the epoch's summed batch losses (`loss_sum`); the last weights are kept
val_loss  Keras' EarlyStopping on `dev_loss`, with restore_best_weights
none      never stops (a fixed schedule decides the length); best_* still name the lowest `loss_sum`

Every rule adds `early_stopping_wait` to the epoch's logs, records 1-based best and stopped epochs for
`summary()`, and is checkpointed (`state_name`, `get_state`, `set_state`; see checkpoint.py).
"""

from __future__ import annotations

import math

import keras


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


class EarlyStop(keras.callbacks.Callback):
    """What every rule shares: the stop itself, the counters' checkpoint, the summary."""

    state_name = "early_stopping"

    def __init__(self, monitor: str, patience: int):
        super().__init__()
        self.monitor, self.patience = monitor, patience
        self.stopped_epoch = 0

    def should_stop(self, epoch: int, logs: dict) -> bool:
        """Update the rule with this epoch's logs (adding early_stopping_wait); True to stop."""
        raise NotImplementedError

    def best(self) -> tuple[int, float]:
        """(1-based best epoch, its monitored value)."""
        raise NotImplementedError

    def on_epoch_end(self, epoch, logs=None):
        if self.should_stop(epoch, logs):
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True

    def summary(self) -> dict:
        """Early-stop facts for train.json and MLflow (epochs are 1-based)."""
        best_epoch, best = self.best()
        return {"monitor": self.monitor, "patience": self.patience, "early_stopped": self.stopped_epoch > 0,
                "stopped_epoch": self.stopped_epoch, "best_epoch": best_epoch, "best_loss": float(best)}


class ReportRule(EarlyStop):
    """monitor=loss: the report's rule on `loss_sum`."""

    def __init__(self, monitor: str, patience: int):
        super().__init__(monitor, patience)
        self.rule = ReportEarlyStopping(patience)

    def should_stop(self, epoch: int, logs: dict) -> bool:
        stop = self.rule.validate(logs["loss_sum"])
        logs["early_stopping_wait"] = self.rule.wait
        return stop

    def best(self) -> tuple[int, float]:
        return self.rule.best_epoch, self.rule.best

    def get_state(self) -> tuple[dict, None]:
        rule = self.rule
        return {"stopped_epoch": self.stopped_epoch, "wait": rule.wait, "best": rule.best,
                "best_epoch": rule.best_epoch, "epochs_seen": rule.epochs_seen}, None

    def set_state(self, state: dict, arrays: None) -> None:
        self.stopped_epoch = state["stopped_epoch"]
        self.rule.wait, self.rule.best, self.rule.best_epoch = state["wait"], state["best"], state["best_epoch"]
        self.rule.epochs_seen = state["epochs_seen"]


class NoEarlyStop(ReportRule):
    """monitor=none: the report's bookkeeping on `loss_sum` (best epoch, wait), never a stop."""

    def should_stop(self, epoch: int, logs: dict) -> bool:
        super().should_stop(epoch, logs)
        return False


class KerasRule(EarlyStop):
    """monitor=val_loss: Keras' EarlyStopping on `dev_loss`, best weights restored at the end."""

    def __init__(self, monitor: str, patience: int):
        super().__init__(monitor, patience)
        self.keras_rule = keras.callbacks.EarlyStopping(monitor="dev_loss", patience=patience,
                                                        restore_best_weights=True, mode="min")
        self._resumed: tuple | None = None

    def set_model(self, model):
        super().set_model(model)
        self.keras_rule.set_model(model)

    def on_train_begin(self, logs=None):
        self.keras_rule.on_train_begin(logs)  # resets Keras' counters: a resumed state goes back on top
        if self._resumed:
            self._apply(*self._resumed)

    def _apply(self, state: dict, best_weights: list | None) -> None:
        self.stopped_epoch = state["stopped_epoch"]
        rule = self.keras_rule
        rule.wait, rule.best, rule.best_epoch, rule.best_weights = (state["wait"], state["best"],
                                                                    state["best_epoch"], best_weights)

    def should_stop(self, epoch: int, logs: dict) -> bool:
        self.keras_rule.on_epoch_end(epoch, logs)
        logs["early_stopping_wait"] = self.keras_rule.wait
        return self.model.stop_training

    def on_train_end(self, logs=None):
        self.keras_rule.on_train_end(logs)

    def best(self) -> tuple[int, float]:
        return self.keras_rule.best_epoch + 1, self.keras_rule.best

    def get_state(self) -> tuple[dict, list | None]:
        rule = self.keras_rule
        state = {"stopped_epoch": self.stopped_epoch, "wait": rule.wait, "best": rule.best,
                 "best_epoch": rule.best_epoch}
        return state, rule.best_weights

    def set_state(self, state: dict, best_weights: list | None) -> None:
        """Continue from a checkpoint's counters: at once, because train.fit() reads stopped_epoch to decide
        whether anything is left to train and, if nothing is, ends with on_train_end alone (which puts the
        best weights back); and again when fit() begins, because Keras resets them there."""
        self._resumed = (state, best_weights)
        self._apply(state, best_weights)


RULES = {"loss": ReportRule, "val_loss": KerasRule, "none": NoEarlyStop}


def make(monitor: str, patience: int) -> EarlyStop:
    """The rule `train.early_stopping.monitor` names."""
    return RULES[monitor](monitor, patience)
