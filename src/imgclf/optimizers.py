"""Optimizers Keras does not ship: Nesterov SGD as PyTorch computes it, with what airbench94 needs."""

from __future__ import annotations

from typing import Callable

import keras
from keras import ops


class NesterovSGD(keras.optimizers.Optimizer):
    """PyTorch's SGD(nesterov=True) with coupled L2, per-variable gradient scales and freezes.

    For each variable w with gradient g:  d = scale(w) * g + l2 * w;  buf = momentum * buf + d;
    w -= lr(step) * (d + momentum * buf). Differences from Keras' SGD: the learning rate multiplies the
    update, not the velocity (a per-step schedule then acts like PyTorch's), and the L2 term goes
    through the momentum (Keras' `weight_decay` is decoupled). `scales` (path -> factor) multiplies a
    variable's gradient but not its decay, which for SGD equals a larger learning rate on that variable.
    `frozen_after` (path -> step) stops updating a variable from that step on. `schedule` is
    (factor(step, total) -> tensor, total steps) multiplying `learning_rate`.
    """

    def __init__(self, learning_rate: float, schedule: tuple[Callable, int], momentum: float, l2: float,
                 scales: dict[str, float] | None = None, frozen_after: dict[str, int] | None = None,
                 name: str = "nesterov_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.schedule, self.momentum, self.l2 = schedule, momentum, l2
        self.scales, self.frozen_after = dict(scales or {}), dict(frozen_after or {})

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.buffers = self.add_optimizer_variables(variables, "momentum")
        self._scale = [self.scales.get(v.path, 1.0) for v in variables]
        self._frozen_after = [self.frozen_after.get(v.path) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        factor, total = self.schedule
        lr = ops.cast(learning_rate * factor(self.iterations, total), variable.dtype)
        d = ops.cast(gradient, variable.dtype) * self._scale[i] + self.l2 * variable
        buf = self.buffers[i]
        self.assign(buf, buf * self.momentum + d)
        step = d + self.momentum * buf
        if self._frozen_after[i] is not None:
            step = step * ops.cast(self.iterations < self._frozen_after[i], variable.dtype)
        self.assign_sub(variable, lr * step)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, l2=self.l2, scales=self.scales, frozen_after=self.frozen_after)
        return config
