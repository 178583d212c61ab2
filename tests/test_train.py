"""The train stage's own pieces (imgclf.train): building either family, the stop reason, history files,
weight hashes, the inference copy."""

from __future__ import annotations

import copy
import csv
import os
import platform

import keras
import numpy as np
import pytest
import yaml

from conftest import REPO
from imgclf import train
from imgclf.files import modelfile
from imgclf.training.callbacks import CollapseDetector
from imgclf.training.distribute import make_strategy
from imgclf.training.early_stopping import make

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
X = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("arch, name, optimizer", [("report", "report_cnn", "Adam"), ("fast", "fast_cnn", "NesterovSGD")])
def test_build_compiled_picks_the_family_model_arch_names(arch, name, optimizer):
    params = copy.deepcopy(PARAMS)
    params["model"].update(arch=arch, conv_blocks=[[4]], dense_units=[])
    params["model"]["fast"].update(widths=[4, 8, 8], whiten_images=20)
    model = train.build_compiled(params, 10, make_strategy("none"), X)
    assert model.name == name and type(model.optimizer).__name__ == optimizer
    assert model.output_shape == (None, 10)


def test_stop_reason():
    early, collapse = make("loss", 5), CollapseDetector(10, True)
    assert train.stop_reason(early, collapse, True) == "training_epochs"
    early.stopped_epoch = 9
    assert train.stop_reason(early, collapse, True) == "early_stopping"
    collapse.collapsed_epoch = 6
    assert train.stop_reason(early, collapse, True) == "collapsed"
    assert train.stop_reason(early, collapse, False) == "early_stopping"  # it only warned


def test_history_csv_has_no_wall_times(tmp_path):
    rows = [{"epoch": e, "loss": 1.0 / e, "loss_sum": 10.0 / e, "accuracy": 0.5, "dev_loss": 1.2, "dev_accuracy": 0.4,
             "dev_f1_macro": 0.3, "early_stopping_wait": 0, "epoch_seconds": 12.3, "dev_predicted_classes": 4}
            for e in (1, 2)]
    train.write_history(rows, tmp_path)
    header = next(csv.reader((tmp_path / "history.csv").open()))
    assert header == ["epoch", "loss", "loss_sum", "accuracy", "dev_loss", "dev_accuracy", "dev_f1_macro",
                      "early_stopping_wait"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_hash_and_inference_copy():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("adam", "mse")
    copy_ = train.inference_copy(model)
    assert modelfile.weights_sha256(copy_) == modelfile.weights_sha256(model) and not getattr(copy_, "optimizer", None)
    model.set_weights([w * 2 for w in model.get_weights()])
    assert modelfile.weights_sha256(copy_) != modelfile.weights_sha256(model)


def test_device_name_names_the_cpu_here():
    """Exactly one answer is right on a given machine: the GPU when TensorFlow sees one, else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    name = train.device_name()
    if gpus:
        assert name.startswith("GPU: ") and name.endswith(f" (x{len(gpus)})"), name
    else:
        assert name == f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
