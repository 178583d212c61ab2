"""`model.arch: report`: the report's VGG-style CNN, its L2 loss and Adam, as Keras code.

Its keys: model.input_scale, conv_blocks, kernel_size, pool_size, conv_dropout, dense_units and
train.learning_rate, regularization_strength, keep_prob. The variants of `imgclf experiments` are
overrides of these keys, never new code.
"""

from __future__ import annotations

import math

from imgclf.training.families import REGISTRY, Family
from imgclf.schema import BOOL, INT_OR_LIST, LIST, NUM, Key, finite, positive_ints

IMAGE_SHAPE = (32, 32, 3)  # the report's flatten is 2*2*512: four pools of 32x32 images


def _conv_blocks_ok(value: list) -> bool:
    """Blocks of positive filter counts; an empty block keeps only its pool, but some block must conv."""
    return all(isinstance(b, list) and positive_ints(b) for b in value) and any(value)


def _per_block_ok(value: int | list) -> bool:
    """One positive size for every block, or a list of one per block (length checked across keys)."""
    return positive_ints(value) and bool(value) if isinstance(value, list) else value >= 1


PARAMS = {
    "model": {
        "input_scale": Key(NUM, lambda v: math.isfinite(v) and v > 0, "> 0"),
        "conv_blocks": Key(LIST, _conv_blocks_ok, "a list of lists of positive ints, at least one non-empty"),
        "kernel_size": Key(INT_OR_LIST, _per_block_ok, ">= 1, or a list of those, one per block"),
        "pool_size": Key(INT_OR_LIST, _per_block_ok, ">= 1, or a list of those, one per block"),
        "conv_dropout": Key(BOOL),
        "dense_units": Key(LIST, positive_ints, "a list of positive ints (may be empty)"),
    },
    "train": {
        "learning_rate": Key(NUM, lambda v: math.isfinite(v) and v > 0, "> 0"),
        "regularization_strength": Key(NUM, lambda v: math.isfinite(v) and v >= 0, ">= 0"),
        "keep_prob": Key(NUM, finite(0, 1, high_open=False), "in (0, 1]"),
    },
}


def check(params: dict) -> list[str]:
    """Per-block lists need one entry per conv block; the report's net takes 32x32 images only."""
    model, problems = params["model"], []
    for key in ("kernel_size", "pool_size"):
        value = model[key]
        if isinstance(value, list) and len(value) != len(model["conv_blocks"]):
            problems.append(f"model.{key}={value}: needs one entry per block of model.conv_blocks "
                            f"({len(model['conv_blocks'])}), or a single integer")
    size = params["data"]["image_size"]
    if model["arch"] == "report" and size != IMAGE_SHAPE[0]:
        problems.append(f"data.image_size={size}: model.arch=report takes 32x32 images only (its flatten is "
                        "2*2*512); set data.image_size: 32 or model.arch: fast")
    return problems


def l2_regularizer(strength: float):
    """The report's `strength * tf.nn.l2_loss(W)`: tf.nn.l2_loss is sum(W**2) / 2, Keras' L2 has no 1/2."""
    import keras

    return keras.regularizers.L2(strength / 2) if strength > 0 else None


def _conv(filters: int, kernel_size: int, reg, name: str):
    """Stride-1/SAME conv + bias + ReLU, Xavier init for kernel and bias as in the report."""
    import keras

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


def _dense(units: int, reg, name: str, dtype: str | None = None):
    """FC layer with no activation (the report's l10/l11 are affine only), Xavier kernel and bias.

    `dtype=None` follows the global (possibly mixed) precision policy.
    """
    import keras

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


def build_model(model_cfg: dict, train_cfg: dict, num_classes: int):
    """Conv blocks (each ending in a stride-2 SAME max-pool) -> flatten -> FC+dropout -> logits.

    The model takes raw pixels: a Rescaling layer by `input_scale` comes first, so every caller
    (evaluate, predict, MLflow pyfunc) feeds the same 0-255 values the report fed.
    """
    import keras

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


def compile_model(model, learning_rate: float, jit_compile: bool = False):
    """Adam + mean softmax cross-entropy on logits; Keras adds the kernels' L2 terms to the loss.

    jit_compile is explicit: Keras' default ("auto") turns XLA on by itself on a GPU without op determinism.
    """
    import keras

    model.compile(
        jit_compile=jit_compile,
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def build(params: dict, num_classes: int, x_train):
    """The family's build: the net params.yaml describes (x_train's images are 32x32, config checked)."""
    return build_model(params["model"], params["train"], num_classes)


def compile_family(model, params: dict, steps_per_epoch: int) -> None:
    compile_model(model, params["train"]["learning_rate"], params["train"]["jit_compile"])


REGISTRY.register("report", Family(params=PARAMS, build=build, compile=compile_family, check=check))
