"""The fast family (imgclf.training.families.fast) and what it brings: whitening, dirac init, the net at any size, the
learning-rate schedule, PyTorch-style Nesterov SGD (imgclf.training.optimizers) and label smoothing."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
import yaml

from conftest import REPO
from imgclf.training.families import fast
from imgclf.training.optimizers import NesterovSGD

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
IMAGES = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)


def fast_params(**knobs) -> dict:
    params = copy.deepcopy(PARAMS)
    params["model"]["arch"] = "fast"
    params["model"]["fast"].update(knobs)
    return params


def patches(x: np.ndarray, k: int = 2) -> np.ndarray:
    """Every k x k patch of x as a row, in Keras' kernel order (kh, kw, c)."""
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * x.shape[-1])


def test_whitening_makes_the_patch_covariance_the_identity():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16, 16, 3)) @ np.array([[1.0, 0.8, 0.1], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])
    kernel = fast.whitening_kernel(x, mean=0.0, std=1 / 255.0, eps=0.0)  # normalises x to itself
    assert kernel.shape == (2, 2, 3, 24)
    flat = kernel.reshape(12, 24)
    np.testing.assert_allclose(flat[:, 12:], -flat[:, :12])  # the second half is the first negated
    p = patches(x)
    whitened = p @ flat[:, :12]
    np.testing.assert_allclose(whitened.T @ whitened / len(p), np.eye(12), atol=1e-8)
    eigenvalues = np.linalg.eigvalsh(p.T @ p / len(p))[::-1]
    norms = np.linalg.norm(flat[:, :12], axis=0)
    np.testing.assert_allclose(norms, 1 / np.sqrt(eigenvalues), rtol=1e-8)  # largest eigenvalue first


def test_statistics_and_whitening_of_large_images_go_chunk_by_chunk_to_the_one_pass_values(monkeypatch):
    x = np.random.default_rng(3).integers(0, 256, (50, 20, 20, 3), dtype=np.uint8)
    scaled = x / 255.0
    mean, std = fast.channel_stats(x)  # one chunk: NumPy's own bits
    assert np.array_equal(mean, scaled.mean(axis=(0, 1, 2))) and np.array_equal(std, scaled.std(axis=(0, 1, 2)))
    one_pass = fast.whitening_kernel(x, mean, std)
    seen = []
    real_chunks = fast._image_chunks
    monkeypatch.setattr(fast, "CHUNK_BYTES", 8 * 12 * 19 * 19 * 7)  # 7 images' patches per chunk
    monkeypatch.setattr(fast, "_image_chunks", lambda *a, **k: (seen.append(len(c)) or c for c in real_chunks(*a, **k)))
    chunked_mean, chunked_std = fast.channel_stats(x)
    np.testing.assert_allclose(chunked_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(chunked_std, std, rtol=1e-13)
    np.testing.assert_allclose(fast.whitening_kernel(x, mean, std), one_pass, rtol=1e-9, atol=1e-12)
    assert max(seen) < len(x) and sum(seen) == 3 * len(x)  # every pass saw every image, in chunks


def test_dirac_makes_the_first_filters_identities():
    kernel = fast.dirac(np.random.default_rng(0).normal(size=(3, 3, 4, 6)))
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 4)).astype(np.float32)
    conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)
    conv.build(x.shape)
    conv.kernel.assign(kernel.astype(np.float32))
    out = conv(x).numpy()
    np.testing.assert_allclose(out[..., :4], x, atol=1e-6)  # passes its input through
    assert np.any(kernel[..., 4:] != 0) and np.count_nonzero(kernel[..., :4]) == 4


@pytest.mark.parametrize("size", [32, 24, 45])
def test_the_net_takes_any_size_and_starts_whitened_and_dirac(size):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(2).integers(0, 256, (40, size, size, 3), dtype=np.uint8)
    model = fast.build(fast_params(whiten_images=30), 7, x)
    assert model.input_shape == (None, size, size, 3) and model.output_shape == (None, 7)
    whiten = model.get_layer("whiten")
    assert not whiten.kernel.trainable and whiten.bias.trainable
    mean, std = fast.channel_stats(x[:30])
    expected = fast.whitening_kernel(x[:30], mean, std)
    np.testing.assert_allclose(whiten.kernel.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.all(model.get_layer("block2_conv2").kernel.numpy()[1, 1] == np.eye(256))
    assert model.get_layer("logit_scale").scale == pytest.approx(1 / 9)
    assert np.isfinite(model(x[:2].astype(np.float32)).numpy()).all()


def test_the_default_net_has_the_hand_computed_size():
    conv = 9 * 24 * 64 + 9 * 64 * 64 + 9 * 64 * 256 + 9 * 256 * 256 + 2 * 9 * 256 * 256
    norms = 3 * 2 * (64 + 256 + 256)  # beta, moving mean and variance of two BNs per block; no scale
    whiten, head = 2 * 2 * 3 * 24 + 24, 256 * 10
    assert fast.build(fast_params(), 10, IMAGES).count_params() == conv + norms + whiten + head == 1_973_944


def test_lr_schedule_points():
    total = 100
    factors = [float(fast.lr_factor(step, total)) for step in (0, 23, 100)]
    assert factors == pytest.approx([0.2, 1.0, 0.07])
    assert float(fast.lr_factor(11.5, total)) == pytest.approx(0.6)  # linear up
    assert float(fast.lr_factor(23 + 77 / 2, total)) == pytest.approx((1.0 + 0.07) / 2)  # linear down


def torch_sgd(w, grads, lr, momentum, wd, lrs):
    """PyTorch's SGD(nesterov=True, weight_decay=wd) by hand: d = g + wd*w; buf = m*buf + d; w -= lr*(d + m*buf)."""
    buf = None
    for g, factor in zip(grads, lrs):
        d = g + wd * w
        buf = d if buf is None else momentum * buf + d
        w = w - lr * factor * (d + momentum * buf)
    return w


def test_nesterov_sgd_is_pytorchs_with_scales_and_freezes():
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=3).astype(np.float32) for _ in range(5)]
    w0 = np.array([1.0, -2.0, 0.5], np.float32)
    variables = [keras.Variable(w0, name=n) for n in ("plain", "scaled", "frozen")]
    scales = {variables[1].path: 64.0}
    schedule = (lambda step, total: 1.0 - keras.ops.cast(step, "float32") / total, 10)
    opt = NesterovSGD(0.1, schedule, momentum=0.85, l2=0.01, scales=scales, frozen_after={variables[2].path: 3})
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(g)] * 3, variables)
    lrs = [1.0 - s / 10 for s in range(5)]
    expected = torch_sgd(w0, grads, 0.1, 0.85, 0.01, lrs)
    np.testing.assert_allclose(variables[0].numpy(), expected, rtol=1e-5)
    # a gradient scale is a larger learning rate on the gradient only: PyTorch with lr*64 and decay/64
    np.testing.assert_allclose(variables[1].numpy(), torch_sgd(w0, grads, 6.4, 0.85, 0.01 / 64, lrs), rtol=1e-5)
    np.testing.assert_allclose(variables[2].numpy(), torch_sgd(w0, grads[:3], 0.1, 0.85, 0.01, lrs), rtol=1e-5)


def test_label_smoothing_spreads_the_target():
    loss = fast.smoothed_cross_entropy(0.2, 4)
    logits = np.array([[2.0, 0.0, -1.0, 0.5]], np.float32)
    log_p = logits - np.log(np.exp(logits).sum())
    target = np.array([0.2 / 4] * 4) + np.eye(4)[2] * 0.8
    assert float(loss(np.array([2]), logits)[0]) == pytest.approx(-(target * log_p).sum(), rel=1e-6)


def test_compile_uses_airbench_units_converted_to_a_mean_loss():
    params = fast_params()
    params["train"]["batch_size"], params["train"]["training_epochs"] = 1024, 10
    model = fast.build(params, 10, IMAGES)
    fast.compile_model(model, params, steps_per_epoch=44)
    opt = model.optimizer
    kilostep = 1024 * (1 + 1 / 0.15)
    assert float(opt.learning_rate) == pytest.approx(11.5 * 1024 / kilostep)  # ~1.5 for a mean loss
    assert opt.l2 == pytest.approx(0.0153 / 11.5) and opt.schedule[1] == 440
    assert sorted(set(opt.scales.values())) == [64.0] and len(opt.scales) == 6  # every BN bias, nothing else
    assert opt.frozen_after == {model.get_layer("whiten").bias.path: 3 * 44}


def newton_schulz(g: np.ndarray, steps: int = 3) -> np.ndarray:
    """airbench94_muon's quintic Newton-Schulz iteration by hand, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (np.linalg.norm(g) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def torch_muon(w_hwio: np.ndarray, grads: list[np.ndarray], lr: float, momentum: float, lrs: list[float]) -> np.ndarray:
    """PyTorch's Muon step of airbench94_muon on an OIHW kernel, given and returned as Keras' HWIO."""
    w = w_hwio.transpose(3, 2, 0, 1).astype(np.float64)  # HWIO -> OIHW
    buf = np.zeros_like(w)
    for g_hwio, factor in zip(grads, lrs):
        g = g_hwio.transpose(3, 2, 0, 1)
        buf = momentum * buf + g
        g = g + momentum * buf
        w = w * np.sqrt(len(w)) / np.linalg.norm(w)
        w = w - lr * factor * newton_schulz(g.reshape(len(g), -1)).reshape(g.shape)
    return w.transpose(2, 3, 1, 0)


@pytest.mark.parametrize("ns_dtype, atol", [("float32", 1e-5), ("bfloat16", 0.24 * 3 * 0.03)])
@pytest.mark.parametrize("shape", [(3, 3, 2, 4), (1, 1, 2, 5)])  # as out x (in·h·w): wide 4 x 18, tall 5 x 2
def test_muon_orthogonalizes_conv_kernels_like_airbench_and_leaves_the_rest_to_nesterov_sgd(shape, ns_dtype, atol):
    from imgclf.training.optimizers import Muon

    rng = np.random.default_rng(5)
    w0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    b0 = np.array([0.5, -1.0], np.float32)
    bias_grads = [rng.normal(size=2).astype(np.float32) for _ in range(3)]
    kernel, bias = keras.Variable(w0, name="kernel"), keras.Variable(b0, name="bias")
    opt = Muon(0.1, (fast.linear_decay, 10), momentum=0.85, l2=0.01, muon_paths=[kernel.path],
               muon_learning_rate=0.24, muon_momentum=0.6, ns_dtype=ns_dtype, schedule_totals={bias.path: 4})
    for g, gb in zip(grads, bias_grads):
        opt.apply([keras.ops.convert_to_tensor(g), keras.ops.convert_to_tensor(gb)], [kernel, bias])
    expected = torch_muon(w0, grads, 0.24, 0.6, [1 - s / 10 for s in range(3)])
    # float32: exact up to rounding; bfloat16 (airbench's): ~3 % of each lr-sized step
    np.testing.assert_allclose(kernel.numpy(), expected, atol=atol)
    assert np.abs(kernel.numpy() - w0 * np.sqrt(shape[-1]) / np.linalg.norm(w0)).max() > 0.1  # lr-sized steps
    # the bias is plain Nesterov SGD with coupled L2 on its own schedule length (4 steps, not 10)
    np.testing.assert_allclose(bias.numpy(), torch_sgd(b0, bias_grads, 0.1, 0.85, 0.01, [1 - s / 4 for s in range(3)]),
                               rtol=1e-5)


def test_newton_schulz_pushes_singular_values_towards_one():
    from imgclf.training.optimizers import orthogonalize

    rng = np.random.default_rng(6)
    u, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    v, _ = np.linalg.qr(rng.normal(size=(40, 16)))
    g = u @ np.diag(np.geomspace(0.5, 10, 16)) @ v.T  # singular values 0.5 .. 10
    out = np.asarray(keras.ops.cast(orthogonalize(keras.ops.convert_to_tensor(g, "float32")), "float32"))
    singular = np.linalg.svd(out, compute_uv=False)
    assert singular.min() > 0.5 and singular.max() < 1.5, singular  # airbench's iteration lands in ~(0.5, 1.5)
    np.testing.assert_allclose(u.T @ out @ v, np.diag(np.diag(u.T @ out @ v)), atol=0.05)  # the same U and V


def test_compile_muon_routes_every_conv_kernel_to_muon_and_converts_the_sgd_groups():
    params = fast_params(optimizer="muon")
    params["train"]["batch_size"], params["train"]["training_epochs"] = 2000, 8
    model = fast.build(params, 10, IMAGES)
    fast.compile_model(model, params, steps_per_epoch=23)
    opt = model.optimizer
    kernels = [v.path for v in model.trainable_variables if len(v.shape) == 4]
    assert sorted(opt.muon_paths) == sorted(kernels) and len(kernels) == 6  # two convs per block, not whitening
    whiten_bias, head = model.get_layer("whiten").bias.path, model.get_layer("head").kernel.path
    assert opt.scales[whiten_bias] == pytest.approx(0.053 * 2000) and opt.scales[head] == pytest.approx(0.67 * 2000)
    assert len(opt.scales) == 1 + 6 + 1  # whitening bias, every BN bias, the head
    assert opt.l2 == pytest.approx(2e-6 * 2000) and opt.schedule[1] == 8 * 23
    assert opt.frozen_after == opt.schedule_totals == {whiten_bias: 3 * 23}
    assert [float(fast.linear_decay(s, 184)) for s in (0, 92, 184)] == pytest.approx([1.0, 0.5, 0.0])
    head_kernel = model.get_layer("head").kernel.numpy()
    assert head_kernel.std() == pytest.approx(1.0, rel=1e-5)  # airbench94_muon's head: std 1, logits / width
    assert float(model.get_layer("logit_scale").scale) == pytest.approx(1 / 256)


@pytest.mark.parametrize("ns_dtype, bf16_native, expected", [
    ("auto", True, "bfloat16"), ("auto", False, "float32"),   # airbench's bf16 only on bf16 hardware
    ("bfloat16", False, "bfloat16"), ("float32", True, "float32"),  # an explicit value is itself
])
def test_newton_schulz_runs_in_bfloat16_only_where_the_machine_multiplies_it_natively(ns_dtype, bf16_native,
                                                                                     expected, capsys):
    params = fast_params(optimizer="muon")
    params["model"]["fast"]["muon"]["ns_dtype"] = ns_dtype
    params["train"]["bf16_native"] = bf16_native  # train.for_this_machine's answer for this machine
    model = fast.build(params, 10, IMAGES)
    fast.compile_model(model, params, steps_per_epoch=23)
    assert model.optimizer.ns_dtype == expected
    assert (f"Muon's Newton-Schulz: {expected} (auto: " in capsys.readouterr().out) is (ns_dtype == "auto")


@pytest.mark.parametrize("sets, culprit", [
    ({"data.image_size": 8, "model.fast.widths": [8, 8, 8, 8]}, "data.image_size=8: too small"),
    ({"data.image_size": 8, "model.fast.translate": 8}, "model.fast.translate=8"),
    ({"model.fast.optimizer": "adam"}, "model.fast.optimizer='adam'"),
    ({"model.fast.muon.learning_rate": 0}, "model.fast.muon.learning_rate=0"),
])
def test_bad_fast_settings_are_refused_in_one_line(sets, culprit):
    from imgclf.config import ConfigError, validate

    params = fast_params()
    params["data"]["dataset"] = "folder"
    for key, value in sets.items():
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node[part]
        node[leaf] = value
    with pytest.raises(ConfigError, match=culprit.replace("[", r"\[")):
        validate(params)


def test_the_fast_muon_preset_is_airbench94_muons_recipe():
    from imgclf.config import apply_overrides, validate
    from imgclf.experiments.presets import PRESETS, REPORT_VARIANTS

    sets = [f"{k}={v}" for k, v in PRESETS["fast_muon"].overrides.items()]
    params = validate(apply_overrides(copy.deepcopy(PARAMS), sets))
    knobs = params["model"]["fast"]
    assert params["model"]["arch"] == "fast" and knobs["optimizer"] == "muon" and knobs["lookahead_every"] == 0
    assert (params["train"]["batch_size"], params["train"]["training_epochs"]) == (2000, 8)
    assert params["evaluate"]["tta"] == "flip_translate" and "fast_muon" not in REPORT_VARIANTS
