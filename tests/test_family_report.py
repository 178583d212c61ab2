"""The report family (imgclf.training.families.report): exact parameter count, the L2 factor, dropout placement,
raw-pixel input, its own params keys."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import REPO
from imgclf.errors import ImgclfError
from imgclf.training.families.report import build_model, compile_model
from imgclf.files.modelfile import load as load_model
from imgclf.files.modelfile import save as save_model

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_cfg(**model):
    params = copy.deepcopy(PARAMS)
    params["model"].update(conv_blocks=[[4], [8]], dense_units=[16], **model)
    return params


def test_default_net_has_the_reports_parameter_count():
    model = build_model(PARAMS["model"], PARAMS["train"], num_classes=10)
    assert model.count_params() == 15_458_378
    assert model.get_layer("flatten").output.shape[-1] == 2 * 2 * 512


@pytest.mark.parametrize("blocks, dense, expected", [
    # conv 3x3: 9*in*out + out; pools halve 32 -> 16 -> 8; dense in*out + out
    ([[4], [8]], [16], (9 * 3 * 4 + 4) + (9 * 4 * 8 + 8) + (8 * 8 * 8 * 16 + 16) + (16 * 10 + 10)),
    ([[4]], [], (9 * 3 * 4 + 4) + (16 * 16 * 4 * 10 + 10)),
])
def test_other_shapes_build_the_same_family(blocks, dense, expected):
    params = tiny_cfg()
    params["model"].update(conv_blocks=blocks, dense_units=dense)
    assert build_model(params["model"], params["train"], 10).count_params() == expected


def test_loss_is_cross_entropy_plus_strength_times_tf_l2_loss():
    keras.utils.set_random_seed(0)
    params = tiny_cfg(input_scale=1 / 255)  # small logits, so the L2 term is a large share of the loss
    model = compile_model(build_model(params["model"], params["train"], 10), 1e-3)
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    y = np.arange(16) % 10
    keras_loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))).numpy()
    kernels = [v for v in model.trainable_variables if len(v.shape) > 1]
    assert len(kernels) == 4  # 2 conv + 1 hidden FC + logits; biases are not regularized
    l2 = 0.01 * sum(tf.nn.l2_loss(v).numpy() for v in kernels)
    assert l2 / 2 > 100 * 1e-5 * (ce + l2)  # a missing or doubled 1/2 would fail the approx below
    assert keras_loss == pytest.approx(ce + l2, rel=1e-5)


def test_per_block_kernels_pools_and_conv_dropout():
    params = tiny_cfg(kernel_size=[5, 16], pool_size=[3, 2], conv_dropout=True)
    params["model"]["conv_blocks"] = [[4], [], [8]]
    params["model"]["kernel_size"], params["model"]["pool_size"] = [5, 1, 3], [3, 2, 2]
    model = build_model(params["model"], params["train"], 10)
    assert model.get_layer("block1_conv1").kernel.shape == (5, 5, 3, 4)
    assert model.get_layer("block1_pool").pool_size == (3, 3) and model.get_layer("block1_pool").strides == (2, 2)
    assert model.get_layer("block3_conv1").kernel.shape == (3, 3, 4, 8)  # the empty block 2 is a pool only
    assert model.get_layer("flatten").output.shape[-1] == 4 * 4 * 8  # 32 -> 16 -> 8 -> 4
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [
        "block1_dropout", "block2_dropout", "block3_dropout", "fc1_dropout"]


def test_dropout_only_after_fc_and_off_at_inference():
    params = tiny_cfg()
    model = build_model(params["model"], params["train"], 10)
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert [d.name for d in dropouts] == ["fc1_dropout"]
    assert dropouts[0].rate == pytest.approx(1 - 0.6)
    x = np.full((4, 32, 32, 3), 200, np.float32)
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.array_equal(model(x, training=True), model(x, training=False))


def test_model_takes_raw_pixels_and_saves_round_trip(tmp_path):
    params = tiny_cfg(input_scale=1 / 255)
    model = build_model(params["model"], params["train"], 10)
    assert model.layers[1].name == "input_scale" and model.layers[1].scale == pytest.approx(1 / 255)
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    save_model(model, tmp_path / "m.keras")
    np.testing.assert_array_equal(load_model(str(tmp_path / "m.keras"))(x), model(x))


def test_initializers_are_xavier_for_kernels_and_biases():
    params = tiny_cfg()
    model = build_model(params["model"], params["train"], 10)
    for name in ("block1_conv1", "fc1", "logits"):
        layer = model.get_layer(name)
        assert isinstance(layer.kernel_initializer, keras.initializers.GlorotUniform)
        assert isinstance(layer.bias_initializer, keras.initializers.GlorotUniform)
        assert np.any(layer.bias.numpy() != 0)


def test_load_model_refuses_a_saved_lambda_and_never_runs_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    inputs = keras.Input((2,))
    payload = lambda x: (__import__("pathlib").Path("pwned").touch(), x)[1]  # noqa: E731 (saved as bytecode)
    outputs = keras.layers.Lambda(payload)(inputs)  # runs once here, while building
    keras.Model(inputs, outputs).save(tmp_path / "evil.keras")
    marker.unlink()
    with pytest.raises(ImgclfError, match=r"evil.keras: not loadable as a safe Keras model \(.*Lambda"):
        load_model(str(tmp_path / "evil.keras"))
    assert not marker.exists()
