"""Optimizers Keras does not ship: Nesterov SGD as PyTorch computes it, with what airbench94 needs, and
airbench94_muon's Muon on conv kernels."""

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
    (factor(step, total) -> tensor, total steps) multiplying `learning_rate`; `schedule_totals`
    (path -> steps) runs a variable's schedule over its own length instead (airbench94_muon's whitening bias).
    """

    def __init__(self, learning_rate: float, schedule: tuple[Callable, int], momentum: float, l2: float,
                 scales: dict[str, float] | None = None, frozen_after: dict[str, int] | None = None,
                 schedule_totals: dict[str, int] | None = None, name: str = "nesterov_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.schedule, self.momentum, self.l2 = schedule, momentum, l2
        self.scales, self.frozen_after = dict(scales or {}), dict(frozen_after or {})
        self.schedule_totals = dict(schedule_totals or {})

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.buffers = self.add_optimizer_variables(variables, "momentum")
        self._scale = [self.scales.get(v.path, 1.0) for v in variables]
        self._frozen_after = [self.frozen_after.get(v.path) for v in variables]
        self._total = [self.schedule_totals.get(v.path, self.schedule[1]) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        factor = self.schedule[0]
        lr = ops.cast(learning_rate * factor(self.iterations, self._total[i]), variable.dtype)
        d = ops.cast(gradient, variable.dtype) * self._scale[i] + self.l2 * variable
        buf = self.buffers[i]
        self.assign(buf, buf * self.momentum + d)
        step = d + self.momentum * buf
        if self._frozen_after[i] is not None:
            step = step * ops.cast(self.iterations < self._frozen_after[i], variable.dtype)
        self.assign_sub(variable, lr * step)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, l2=self.l2, scales=self.scales, frozen_after=self.frozen_after,
                      schedule_totals=self.schedule_totals)
        return config


# Quintic Newton-Schulz coefficients (airbench94_muon): chosen to maximise the slope at zero, so a few steps
# push every singular value into roughly (0.5, 1.5) rather than converging to exactly 1.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(update, steps: int = 3, dtype: str = "bfloat16", eps: float = 1e-7):
    """A 2-D update with its singular values pushed towards 1 (≈ U Vᵀ of its SVD), computed in `dtype`
    (airbench: bfloat16, whose rounding the iteration tolerates; float32 in tests, to compare exactly)."""
    a, b, c = NEWTON_SCHULZ
    x = ops.cast(update, dtype)
    x = x / (ops.cast(ops.sqrt(ops.sum(ops.square(ops.cast(x, "float32")))), dtype) + eps)
    tall = update.shape[0] > update.shape[1]
    if tall:  # iterate on the short side: the Gram matrix is then the small one
        x = ops.transpose(x)
    for _ in range(steps):
        gram = ops.matmul(x, ops.transpose(x))
        x = a * x + ops.matmul(b * gram + c * ops.matmul(gram, gram), x)
    return ops.transpose(x) if tall else x


class Muon(NesterovSGD):
    """airbench94_muon's optimizer: Muon on the conv kernels `muon_paths` names, NesterovSGD on the rest.

    For each such kernel w (Keras HWIO, out channels last) with gradient g: buf = m * buf + g;
    g = g + m * buf (Nesterov); w = w * sqrt(out) / ||w||; w -= lr(step) * O(g) with O the Newton-Schulz
    orthogonalization of g as an out x (h·w·in) matrix. Orthogonalizing is blind to the order of a row's
    entries, so HWIO's h·w·in rows give PyTorch's in·h·w result, permuted back. The update's scale does
    not depend on the gradient's, so a mean loss needs no conversion. `schedule` multiplies
    `muon_learning_rate` too. Keras' own Muon sends 4-D kernels to AdamW: on a CNN it is not Muon.
    """

    def __init__(self, learning_rate: float, schedule: tuple[Callable, int], momentum: float, l2: float,
                 muon_paths: list[str], muon_learning_rate: float, muon_momentum: float, ns_steps: int = 3,
                 ns_dtype: str = "bfloat16", name: str = "muon", **kwargs):
        super().__init__(learning_rate, schedule, momentum, l2, name=name, **kwargs)
        self.muon_paths, self.muon_learning_rate = list(muon_paths), muon_learning_rate
        self.muon_momentum, self.ns_steps, self.ns_dtype = muon_momentum, ns_steps, ns_dtype

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._muon = [v.path in self.muon_paths for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        if not self._muon[i]:
            return super().update_step(gradient, variable, learning_rate)
        factor, total = self.schedule
        buf, m = self.buffers[i], self.muon_momentum
        g = ops.cast(gradient, variable.dtype)
        self.assign(buf, buf * m + g)
        g = g + m * buf
        out = variable.shape[-1]
        self.assign(variable, variable * (out ** 0.5 / ops.sqrt(ops.sum(ops.square(variable)))))
        rows = ops.transpose(ops.reshape(g, (-1, out)))  # out x (h·w·in)
        step = ops.reshape(ops.transpose(orthogonalize(rows, self.ns_steps, self.ns_dtype)), variable.shape)
        lr = ops.cast(self.muon_learning_rate * factor(self.iterations, total), variable.dtype)
        self.assign_sub(variable, lr * ops.cast(step, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(muon_paths=self.muon_paths, muon_learning_rate=self.muon_learning_rate,
                      muon_momentum=self.muon_momentum, ns_steps=self.ns_steps, ns_dtype=self.ns_dtype)
        return config
