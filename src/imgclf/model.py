"""The report's VGG-style CNN as a Keras functional model, and its training loss."""

from __future__ import annotations

import keras

from imgclf.io import ImgclfError

IMAGE_SHAPE = (32, 32, 3)


def l2_regularizer(strength: float) -> keras.regularizers.L2 | None:
    """The report's `strength * tf.nn.l2_loss(W)`: tf.nn.l2_loss is sum(W**2) / 2, Keras' L2 has no 1/2."""
    return keras.regularizers.L2(strength / 2) if strength > 0 else None


def _conv(filters: int, kernel_size: int, reg, name: str) -> keras.layers.Conv2D:
    """Stride-1/SAME conv + bias + ReLU, Xavier init for kernel and bias as in the report."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        activation="relu",
        kernel_initializer="glorot_uniform",
        bias_initializer="glorot_uniform",
        kernel_regularizer=reg,
        name=name,
    )


def _dense(units: int, reg, name: str, dtype: str | None = None) -> keras.layers.Dense:
    """FC layer with no activation (the report's l10/l11 are affine only), Xavier kernel and bias.

    `dtype=None` follows the global (possibly mixed) precision policy.
    """
    return keras.layers.Dense(
        units,
        kernel_initializer="glorot_uniform",
        bias_initializer="glorot_uniform",
        kernel_regularizer=reg,
        name=name,
        dtype=dtype,
    )


def per_block(value: int | list[int], blocks: int) -> list[int]:
    """A size given once for every block, or already one per block."""
    return list(value) if isinstance(value, list) else [value] * blocks


def build_model(model_cfg: dict, train_cfg: dict, num_classes: int) -> keras.Model:
    """Conv blocks (each ending in a stride-2 SAME max-pool) -> flatten -> FC+dropout -> logits.

    The model takes raw pixels: a Rescaling layer by `input_scale` comes first, so every caller
    (evaluate, predict, MLflow pyfunc) feeds the same 0-255 values the report fed.
    """
    reg = l2_regularizer(train_cfg["regularization_strength"])
    dropout_rate = 1.0 - train_cfg["keep_prob"]
    blocks = model_cfg["conv_blocks"]
    kernels = per_block(model_cfg["kernel_size"], len(blocks))
    pools = per_block(model_cfg["pool_size"], len(blocks))
    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = keras.layers.Rescaling(model_cfg["input_scale"], name="input_scale")(inputs)
    for b, (block, kernel, pool) in enumerate(zip(blocks, kernels, pools), start=1):
        for c, filters in enumerate(block, start=1):
            x = _conv(filters, kernel, reg, f"block{b}_conv{c}")(x)
        x = keras.layers.MaxPooling2D(pool_size=pool, strides=2, padding="same", name=f"block{b}_pool")(x)
        if model_cfg["conv_dropout"]:
            x = keras.layers.Dropout(dropout_rate, name=f"block{b}_dropout")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(model_cfg["dense_units"], start=1):
        x = _dense(units, reg, f"fc{i}")(x)
        x = keras.layers.Dropout(dropout_rate, name=f"fc{i}_dropout")(x)
    # float32 logits even under a mixed policy: softmax cross-entropy in float16 loses precision and overflows.
    logits = _dense(num_classes, reg, "logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name="report_cnn")


def compile_model(model: keras.Model, learning_rate: float, jit_compile: bool = False) -> keras.Model:
    """Adam + mean softmax cross-entropy on logits; Keras adds the kernels' L2 terms to the loss.

    jit_compile is explicit: Keras' default ("auto") turns XLA on by itself on a GPU without op determinism.
    """
    model.compile(
        jit_compile=jit_compile,
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def load_model(path: str) -> keras.Model:
    """Load a saved model for inference only; safe_mode refuses pickled Python lambdas in the file."""
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:  # safe mode's refusal, or not a Keras model file at all
        reason = " ".join(str(exc).split())[:160]
        raise ImgclfError(f"{path}: not loadable as a safe Keras model ({reason}); use a model saved by imgclf") from None
