"""`model.arch: fast`: an airbench94-style net and recipe (KellerJordan/cifar10-airbench), ported to Keras.

Net: per-channel normalisation -> a frozen 2x2 patch-whitening conv (its bias trains for a few epochs)
-> GELU -> three blocks [conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU] whose convs have
no bias and start as identities ("dirac") -> global max pool -> linear without bias -> logits x 1/9.
BN: eps 1e-12, no scale, fast running statistics. Training: PyTorch-style Nesterov SGD with coupled
L2, learning rate and weight decay quoted per 1024 examples, BN biases at 64x the learning rate, a
piecewise-linear per-step schedule, label smoothing, lookahead of the weights and BN statistics, and
random translation with alternating flips in the input pipeline (augment.py). Its knobs are
`model.fast.*`; the `fast` preset of `imgclf experiments` sets the rest (batch size, epochs, TTA).

`model.fast.optimizer: muon` is airbench94_muon's recipe instead: Muon (optimizers.Muon) on every trainable
conv kernel, Nesterov SGD on the whitening bias, BN biases and head at their own learning rates
(`model.fast.muon.*`, airbench's summed-loss units), every learning rate decaying linearly to 0 (the
whitening bias's over its `whiten_bias_epochs`), and the head as airbench94_muon has it: weights of std 1,
logits divided by the last width. The `fast_muon` preset adds batch 2000, 8 epochs and no lookahead.
"""

from __future__ import annotations

import numpy as np

from imgclf.training.augment import FLIPS, Augment
from imgclf.training.numerics import bf16_native, chosen_kernels
from imgclf.training.families import REGISTRY, Family
from imgclf.schema import INT, LIST, NUM, Key, finite, one_of, positive_ints

WHITEN_KERNEL = 2           # the whitening conv sees 2x2 patches
WHITEN_EPS = 5e-4           # added to the patch covariance's eigenvalues before 1/sqrt
LOGIT_SCALE = 1 / 9         # airbench's output scaling
BN_EPSILON = 1e-12
CHUNK_BYTES = 256 << 20     # float64 work per chunk of the whitening sample (CIFAR's 5,000 images: one chunk)
LR_SCHEDULE = (0.2, 0.23, 1.0, 0.07)  # lr factor: 0.2 at step 0, 1.0 at 23 % of the steps, 0.07 at the end
LOOKAHEAD_DECAY = 0.95      # per step; a sync every k steps uses 0.95**k * (step / total)**3
LOOKAHEAD_FROM_EPOCH = 3    # 1-based epoch of the first lookahead sync
OPTIMIZERS = ("nesterov", "muon")
# Muon's Newton-Schulz matmuls. auto: airbench's bfloat16 where bfloat16 hardware runs it (a GPU, a CPU with bf16
# instructions through oneDNN), float32 elsewhere: TensorFlow's emulated bfloat16 matmuls cost more than float32's.
NS_DTYPES = ("auto", "bfloat16", "float32")

PARAMS = {"model": {"fast": {
    "widths": Key(LIST, lambda v: bool(v) and positive_ints(v), "a non-empty list of positive ints"),
    "batchnorm_momentum": Key(NUM, finite(0, 1, low_open=False), "in [0, 1)"),
    "whiten_images": Key(INT, lambda v: v >= 1, ">= 1"),
    "whiten_bias_epochs": Key(INT, lambda v: v >= 0, ">= 0"),
    "learning_rate": Key(NUM, finite(0), "> 0"),
    "momentum": Key(NUM, finite(0, 1, low_open=False), "in [0, 1)"),
    "weight_decay": Key(NUM, finite(0, low_open=False), ">= 0"),
    "bias_lr_scale": Key(NUM, finite(0), "> 0"),
    "label_smoothing": Key(NUM, finite(0, 1, low_open=False), "in [0, 1)"),
    "lookahead_every": Key(INT, lambda v: v >= 0, ">= 0 (0: no lookahead)"),
    "translate": Key(INT, lambda v: v >= 0, ">= 0"),
    "flip": one_of(FLIPS),
    "optimizer": one_of(OPTIMIZERS),
    "muon": {
        "learning_rate": Key(NUM, finite(0), "> 0"),
        "momentum": Key(NUM, finite(0, 1, low_open=False), "in [0, 1)"),
        "bias_learning_rate": Key(NUM, finite(0), "> 0"),
        "head_learning_rate": Key(NUM, finite(0), "> 0"),
        "weight_decay": Key(NUM, finite(0, low_open=False), ">= 0"),
        "ns_dtype": one_of(NS_DTYPES),
    },
}}}


def check(params: dict) -> list[str]:
    """The image must survive the whitening conv and every block's pool; translation needs room to reflect."""
    if params["model"]["arch"] != "fast":
        return []
    knobs, size, problems = params["model"]["fast"], params["data"]["image_size"], []
    side = size - (WHITEN_KERNEL - 1)
    for _ in knobs["widths"]:
        side //= 2
    if side < 1:
        problems.append(f"data.image_size={size}: too small for {len(knobs['widths'])} blocks of model.fast.widths "
                        f"(each halves the image after the {WHITEN_KERNEL}x{WHITEN_KERNEL} whitening conv); "
                        f"use larger images or fewer widths")
    if knobs["translate"] >= size:
        problems.append(f"model.fast.translate={knobs['translate']}: must be below data.image_size ({size}), "
                        "reflect padding needs that many pixels")
    return problems


def _uniform():
    """PyTorch's default conv/linear init, U(+-1/sqrt(fan_in)), as airbench's layers start."""
    import keras

    return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")


def _conv_group(x, width: int, momentum: float, name: str):
    import keras

    def conv(y, suffix):
        return keras.layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=_uniform(),
                                   name=f"{name}_{suffix}")(y)

    def norm_gelu(y, suffix):
        y = keras.layers.BatchNormalization(momentum=momentum, epsilon=BN_EPSILON, scale=False,
                                            name=f"{name}_norm{suffix}")(y)
        return keras.layers.Activation("gelu", name=f"{name}_gelu{suffix}")(y)

    x = keras.layers.MaxPooling2D(2, name=f"{name}_pool")(conv(x, "conv1"))
    return norm_gelu(conv(norm_gelu(x, 1), "conv2"), 2)


def _image_chunks(x: np.ndarray, per_image_bytes: int, most: int | None = None):
    """x in slices of as many images (at most `most`) as fit CHUNK_BYTES of per-image float64 work: a
    whitening sample of large images (5,000 at 224 px is 6 GB as float64) is never converted at once."""
    step = min(most or len(x), max(1, CHUNK_BYTES // per_image_bytes))
    return (x[start:start + step] for start in range(0, len(x), step))


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], as np.mean and np.std compute them (two
    passes in float64, chunk by chunk; one chunk, and so NumPy's very bits, for CIFAR-sized samples)."""
    pixels = x.size // x.shape[-1]
    chunks = lambda: _image_chunks(x, 8 * int(np.prod(x.shape[1:])))  # noqa: E731
    mean = sum(np.add.reduce(c.astype(np.float64) / 255.0, axis=(0, 1, 2)) for c in chunks()) / pixels
    squares = sum(np.add.reduce(np.square(c.astype(np.float64) / 255.0 - mean), axis=(0, 1, 2)) for c in chunks())
    return mean, np.sqrt(squares / pixels)


def whitening_kernel(x: np.ndarray, mean: np.ndarray, std: np.ndarray, eps: float = WHITEN_EPS,
                     k: int = WHITEN_KERNEL) -> np.ndarray:
    """(k, k, C, 2·k·k·C) conv kernel from uint8 images normalised by mean and std: the eigenvectors of the
    uncentered covariance of their k x k patches, largest first, each scaled by 1/sqrt(eigenvalue + eps),
    then the same negated."""
    dim = k * k * x.shape[-1]
    cov, count = np.zeros((dim, dim)), 0
    patch_bytes = 8 * dim * (x.shape[1] - k + 1) * (x.shape[2] - k + 1)
    for chunk in _image_chunks(x, patch_bytes, most=500):  # 500 images' patches: 46 MB at 32 px
        normalized = (chunk / 255.0 - mean) / std
        patches = np.lib.stride_tricks.sliding_window_view(normalized, (k, k), axis=(1, 2))
        patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim)  # (kh, kw, c): Keras' kernel order
        cov += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(cov / count)
    order = np.argsort(eigenvalues)[::-1]
    filters = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    return np.concatenate([filters, -filters], axis=1).reshape(k, k, x.shape[-1], 2 * dim)


def dirac(kernel: np.ndarray) -> np.ndarray:
    """The kernel with its first C_in filters replaced by identities (a 1 at the centre tap of channel i)."""
    kernel = np.array(kernel)
    n = min(kernel.shape[2], kernel.shape[3])
    kernel[:, :, :, :n] = 0
    kernel[kernel.shape[0] // 2, kernel.shape[1] // 2, np.arange(n), np.arange(n)] = 1
    return kernel


def build(params: dict, num_classes: int, x_train: np.ndarray):
    """The net for x_train's image size; normalisation and whitening are set from its first images."""
    import keras

    knobs = params["model"]["fast"]
    sample = x_train[:knobs["whiten_images"]]
    mean, std = channel_stats(sample)
    inputs = keras.Input(x_train.shape[1:], name="image")
    # float32 up to the whitening conv: its 1/sqrt(eigenvalue) filters are large, and the layers are tiny
    x = keras.layers.Rescaling([float(s) for s in 1 / (255 * std)], [float(o) for o in -mean / std],
                               name="normalize", dtype="float32")(inputs)
    whiten = keras.layers.Conv2D(2 * WHITEN_KERNEL ** 2 * x_train.shape[-1], WHITEN_KERNEL, padding="valid",
                                 bias_initializer="zeros", name="whiten", dtype="float32")
    x = keras.layers.Activation("gelu", name="whiten_gelu")(whiten(x))
    for i, width in enumerate(knobs["widths"], start=1):
        x = _conv_group(x, width, knobs["batchnorm_momentum"], f"block{i}")
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    head = keras.layers.Dense(num_classes, use_bias=False, kernel_initializer=_uniform(), name="head",
                              dtype="float32")
    muon = knobs["optimizer"] == "muon"  # airbench94_muon's head: logits / last width, weights of std 1
    logits = keras.layers.Rescaling(1 / knobs["widths"][-1] if muon else LOGIT_SCALE, name="logit_scale",
                                    dtype="float32")(head(x))
    model = keras.Model(inputs, logits, name="fast_cnn")
    whiten.kernel.assign(whitening_kernel(sample, mean, std).astype(np.float32))
    whiten.kernel.trainable = False
    for layer in model.layers:
        if layer.name.endswith(("_conv1", "_conv2")):
            layer.kernel.assign(dirac(layer.kernel.numpy()))
    if muon:
        head.kernel.assign(head.kernel.numpy() / head.kernel.numpy().std())
    return model


def lr_factor(step, total_steps: int):
    """The per-step schedule LR_SCHEDULE describes (step may be a tensor)."""
    from keras import ops

    start, peak_at, peak, end = LR_SCHEDULE
    warm = float(max(int(total_steps * peak_at), 1))
    step = ops.cast(step, "float32")
    up = start + (peak - start) * step / warm
    down = peak + (end - peak) * (step - warm) / max(total_steps - warm, 1.0)
    return ops.where(step < warm, up, down)


def smoothed_cross_entropy(smoothing: float, num_classes: int):
    """Mean softmax cross-entropy on logits against label-smoothed targets, for sparse integer labels."""
    import keras
    from keras import ops

    def loss(y_true, logits):
        target = ops.one_hot(ops.cast(ops.reshape(y_true, [-1]), "int32"), num_classes)
        return keras.losses.categorical_crossentropy(target, logits, from_logits=True, label_smoothing=smoothing)

    return loss


def linear_decay(step, total_steps: int):
    """airbench94_muon's schedule for every learning rate: 1 at step 0, down to 0 at total_steps."""
    from keras import ops

    return 1.0 - ops.cast(step, "float32") / float(max(total_steps, 1))


def nesterov(model, params: dict, steps_per_epoch: int):
    """airbench94's Nesterov SGD, converted from its summed loss to Keras' mean loss."""
    import keras

    from imgclf.training.optimizers import NesterovSGD

    knobs, cfg = params["model"]["fast"], params["train"]
    kilostep = 1024 * (1 + 1 / (1 - knobs["momentum"]))  # airbench: lr and decay are quoted per 1024 examples
    betas = [layer.beta.path for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    return NesterovSGD(
        learning_rate=knobs["learning_rate"] * cfg["batch_size"] / kilostep,
        schedule=(lr_factor, steps_per_epoch * cfg["training_epochs"]),
        momentum=knobs["momentum"], l2=knobs["weight_decay"] / knobs["learning_rate"],
        scales={path: knobs["bias_lr_scale"] for path in betas},
        frozen_after={model.get_layer("whiten").bias.path: knobs["whiten_bias_epochs"] * steps_per_epoch})


def muon(model, params: dict, steps_per_epoch: int):
    """airbench94_muon's two optimizers as one: Muon on the conv kernels, Nesterov SGD on the rest.

    airbench gives each SGD group its own lr and weight decay wd / lr on a summed loss, so the decay step
    is wd * w for every group: a gradient scale of lr * batch (summed from mean) and l2 = wd do the same.
    """
    import keras

    from imgclf.training.optimizers import Muon

    knobs, cfg = params["model"]["fast"], params["train"]
    rates, batch = knobs["muon"], cfg["batch_size"]
    whiten_bias = model.get_layer("whiten").bias.path
    biases = [whiten_bias, *(layer.beta.path for layer in model.layers
                             if isinstance(layer, keras.layers.BatchNormalization))]
    scales = {path: rates["bias_learning_rate"] * batch for path in biases}
    scales[model.get_layer("head").kernel.path] = rates["head_learning_rate"] * batch
    whiten_steps = knobs["whiten_bias_epochs"] * steps_per_epoch
    ns_dtype = newton_schulz_dtype(params)
    if rates["ns_dtype"] == "auto":
        print(f"Muon's Newton-Schulz: {ns_dtype} (auto: {'' if ns_dtype == 'bfloat16' else 'no '}bfloat16 "
              "hardware on this path)")
    return Muon(
        learning_rate=1.0, schedule=(linear_decay, steps_per_epoch * cfg["training_epochs"]),
        momentum=knobs["momentum"], l2=rates["weight_decay"] * batch, scales=scales,
        frozen_after={whiten_bias: whiten_steps}, schedule_totals={whiten_bias: whiten_steps},
        muon_paths=[v.path for v in model.trainable_variables if len(v.shape) == 4],
        muon_learning_rate=rates["learning_rate"], muon_momentum=rates["momentum"], ns_dtype=ns_dtype)


def newton_schulz_dtype(params: dict) -> str:
    """model.fast.muon.ns_dtype as Muon runs it: `auto` is airbench's bfloat16 only where bfloat16 has hardware on
    the kernel path (a GPU, a CPU with avx512_bf16/amx_bf16 through oneDNN), float32 elsewhere, where emulated
    bfloat16 matmuls cost more than they save."""
    cfg, asked = params["train"], params["model"]["fast"]["muon"]["ns_dtype"]
    if asked != "auto":
        return asked
    # train resolves bf16_native for this machine (train.for_this_machine); a bare build asks the CPU
    native = cfg["bf16_native"] if "bf16_native" in cfg else bf16_native(
        chosen_kernels(cfg["numerics"], cfg["kernels"])[0], gpu=False)
    return "bfloat16" if native else "float32"


def compile_model(model, params: dict, steps_per_epoch: int) -> None:
    """The optimizer `model.fast.optimizer` names, label-smoothed cross-entropy and accuracy."""
    import keras

    knobs = params["model"]["fast"]
    optimizer = {"nesterov": nesterov, "muon": muon}[knobs["optimizer"]](model, params, steps_per_epoch)
    model.compile(optimizer=optimizer, jit_compile=params["train"]["jit_compile"],
                  loss=smoothed_cross_entropy(knobs["label_smoothing"], model.output_shape[-1]),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


def augment(params: dict) -> Augment:
    knobs = params["model"]["fast"]
    return Augment(params["seed"], knobs["translate"], knobs["flip"])


def callbacks(params: dict, steps_per_epoch: int) -> list:
    from imgclf.training.callbacks import Lookahead

    every = params["model"]["fast"]["lookahead_every"]
    total = steps_per_epoch * params["train"]["training_epochs"]
    start = (LOOKAHEAD_FROM_EPOCH - 1) * steps_per_epoch
    return [Lookahead(every, total, start, LOOKAHEAD_DECAY)] if every else []


REGISTRY.register("fast", Family(params=PARAMS, build=build, compile=compile_model, check=check, augment=augment,
                                 callbacks=callbacks))
