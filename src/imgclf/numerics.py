"""What decides the numbers a training run computes: seeds, op determinism, TF32 and mixed precision."""

from __future__ import annotations

import contextlib


def seed_everything(seed: int, jit_compile: bool = False, tf32: bool = False) -> None:
    """Seed Python, NumPy and TF from params.yaml (never the clock); make TF ops deterministic unless XLA;
    allow TF32 matmuls and convolutions only when asked.

    Keras silently turns XLA off while op determinism is on (not every XLA kernel is deterministic),
    so train.jit_compile=true has to trade bit-identical reruns for its speed. TensorFlow enables TF32
    by default on Ampere and newer GPUs (10-bit mantissas in matmuls and convolutions); the report's net
    ran in float32, and with TF32 its default seed collapsed to one class on an H200.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_tensor_float_32_execution(tf32)
    if not jit_compile:
        tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def precision_policy(name: str):
    """Layers built inside get Keras' `mixed_float16`/`mixed_bfloat16` policy (`none`: float32).

    The global policy is restored afterwards: each layer keeps its own policy, and nothing built
    later (the inference copy, other tests) should inherit it by accident.
    """
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if name == "none" else name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
