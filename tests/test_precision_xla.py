"""The GPU switches run (slowly) on a CPU: mixed precision keeps float32 weights, logits and loss; XLA compiles."""

from __future__ import annotations

import copy
import math

import keras
import numpy as np
import pytest

from conftest import REPO
from imgclf.config import load_params
from imgclf.training.distribute import make_strategy
from imgclf.training.input_pipeline import make_dataset, steps_per_epoch
from imgclf.training.numerics import seed_everything
from imgclf.train import build_compiled

PARAMS = load_params(REPO / "params.yaml", ["model.conv_blocks=[[4], [8]]", "model.dense_units=[16]"])
X = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
Y = np.arange(48) % 10


def compiled(**train) -> keras.Model:
    """The tiny net, built and compiled exactly as train() does, with train.* switches changed."""
    params = copy.deepcopy(PARAMS)
    params["train"].update(train)
    return build_compiled(params, 10, make_strategy("none"), X)


def fit_one_epoch(model: keras.Model) -> float:
    history = model.fit(make_dataset(X, Y, 16, 51, 0, 1), epochs=1, steps_per_epoch=steps_per_epoch(48, 16),
                        shuffle=False, verbose=0)  # the dataset shuffles itself, as in train.fit
    return history.history["loss"][0]


@pytest.mark.parametrize("policy, compute_dtype, optimizer", [
    ("mixed_float16", "float16", "LossScaleOptimizer"),  # Keras adds dynamic loss scaling for float16 only
    ("mixed_bfloat16", "bfloat16", "Adam"),
])
def test_mixed_precision_keeps_float32_weights_logits_and_loss(policy, compute_dtype, optimizer):
    reference, model = compiled(), compiled(mixed_precision=policy)
    model.set_weights(reference.get_weights())
    assert model.get_layer("block1_conv1").compute_dtype == compute_dtype
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
    assert model.get_layer("logits").compute_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored after building
    x = X[:8].astype(np.float32)
    logits = model(x, training=False)
    assert logits.dtype == "float32"
    # Same weights, same inputs: half precision changes the last digits, not the function.
    expected = reference(x, training=False).numpy()
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0.05, atol=0.05 * np.abs(expected).max())
    assert type(model.optimizer).__name__ == optimizer
    assert math.isfinite(fit_one_epoch(model))


def test_jit_compile_trains_with_xla_and_leaves_op_determinism_off():
    seed_everything(PARAMS["seed"], jit_compile=True)  # as train() does: Keras drops XLA under op determinism
    model = compiled(jit_compile=True)
    assert math.isfinite(fit_one_epoch(model))
    assert model.jit_compile is True  # still on after the first step: XLA really compiled it
    assert compiled().jit_compile is False  # the default is an explicit False, never Keras' "auto"
