"""Model families, one module each, registered under the name `model.arch` takes.

A family module builds a `Family` and registers it:

    REGISTRY.register("mine", Family(params=PARAMS, build=build, compile=compile_model))

Family modules import Keras inside their functions: config.py reads every family's `params` to
validate params.yaml, and validation must not wait for TensorFlow to load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from imgclf.plugins import Registry


def _no_problems(params: dict) -> list[str]:
    return []


def _nothing(params: dict) -> None:
    return None


def _no_callbacks(params: dict, steps_per_epoch: int) -> list:
    return []


@dataclass(frozen=True)
class Family:
    """A registered model family.

    params     its own params.yaml keys, merged into config's schema: {"model": {...}, "train": {...}}
    build      (params, num_classes, x_train) -> an uncompiled keras.Model taking raw 0-255 pixels and
               returning logits; x_train is there for data-dependent initialisation (its first images)
    compile    (model, params, steps_per_epoch) -> None: optimizer, loss (sparse labels) and `accuracy`
    check      params -> problems with keys that span sections (config's cross-check)
    augment    params -> None, or augment.Augment for the training input pipeline
    callbacks  (params, steps_per_epoch) -> extra training callbacks; those with `state_name` are
               checkpointed after every epoch (see checkpoint.py)
    """

    params: dict[str, Any]
    build: Callable
    compile: Callable
    check: Callable[[dict], list[str]] = field(default=_no_problems)
    augment: Callable[[dict], Any] = field(default=_nothing)
    callbacks: Callable[[dict, int], list] = field(default=_no_callbacks)


REGISTRY: Registry[Family] = Registry("model family", __name__, __path__)
