"""params.yaml validation: every problem reported at once, by name, before any work."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from imgclf.config import ConfigError, load_params, validate
from imgclf.tracking.context import flatten

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def params_with(**changes):
    """The repo's params.yaml with dotted keys replaced."""
    params = copy.deepcopy(DEFAULT)
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[leaf] = value
    return params


def test_repo_params_are_the_reports_settings():
    params = load_params(REPO / "params.yaml")
    assert params["seed"] == 51
    assert params["train"] == {
        "learning_rate": 0.001, "training_epochs": 50, "batch_size": 128, "regularization_strength": 0.01,
        "keep_prob": 0.6, "early_stopping": {"monitor": "loss", "patience": 5},
        "mixed_precision": "none", "jit_compile": False, "distribute": "none",  # the report: float32, one device
        "tf32": False, "stop_on_collapse": True,  # full float32 on GPUs too
        "numerics": "native",  # this CPU's fastest kernels
        "kernels": "auto",  # oneDNN's wherever the CPU has AVX2
    }
    assert params["model"]["input_scale"] == 1.0 and params["model"]["arch"] == "report"
    assert params["data"]["dataset"] == "digits" and params["data"]["image_size"] == 32
    assert params["evaluate"] == {"tta": "none"}


@pytest.mark.parametrize("key, value, expected", [
    ("train.keep_prob", 0, "train.keep_prob=0: must be in (0, 1]"),
    ("train.keep_prob", 1.5, "train.keep_prob=1.5: must be in (0, 1]"),
    ("train.learning_rate", 0, "train.learning_rate=0: must be > 0"),
    ("train.learning_rate", "fast", "train.learning_rate: must be a number, got 'fast'"),
    ("train.batch_size", 0, "train.batch_size=0: must be >= 1"),
    ("train.batch_size", 12.5, "train.batch_size: must be an integer"),
    ("train.training_epochs", 0, "train.training_epochs=0: must be >= 1"),
    ("train.early_stopping.patience", -1, "train.early_stopping.patience=-1: must be >= 0"),
    ("train.early_stopping.monitor", "acc", "must be one of loss, val_loss, none"),
    ("train.tf32", "yes", "train.tf32: must be true/false, got 'yes'"),
    ("train.numerics", "exact", "train.numerics='exact': must be one of native, portable"),
    ("evaluate.tta", "mirror", "evaluate.tta='mirror': must be one of none, flip, flip_translate"),
    ("model.arch", "vgg", "model.arch='vgg': must be one of fast, report"),
    ("model.fast.widths", [], "model.fast.widths=[]: must be a non-empty list of positive ints"),
    ("model.fast.flip", "both", "model.fast.flip='both': must be one of none, random, alternating"),
    ("model.fast.momentum", 1.0, "model.fast.momentum=1.0: must be in [0, 1)"),
    ("data.image_size", 4, "data.image_size=4: must be in 8..1024"),
    ("data.image_size", 64, "data.image_size=64: the digits source has 32x32 images only"),
    ("train.mixed_precision", "float16", "must be one of none, mixed_float16, mixed_bfloat16"),
    ("train.jit_compile", 1, "train.jit_compile: must be true/false, got 1"),
    ("train.distribute", "tpu", "train.distribute='tpu': must be one of none, mirrored, multi_worker"),
    ("data.dev_fraction", 1, "data.dev_fraction=1: must be in (0, 1)"),
    ("data.dev_fraction", 0, "data.dev_fraction=0: must be in (0, 1)"),
    ("data.dataset", "mnist", "must be one of cifar10, digits, folder, npz"),
    ("model.conv_blocks", [], "model.conv_blocks=[]: must be a list of lists of positive ints, at least one"),
    ("model.conv_blocks", [[64, 0]], "model.conv_blocks=[[64, 0]]"),
    ("model.conv_blocks", [[], []], "model.conv_blocks=[[], []]: must be"),
    ("model.conv_blocks", [64, 64], "model.conv_blocks=[64, 64]: must be"),
    ("model.kernel_size", [3, 3], "model.kernel_size=[3, 3]: needs one entry per block of model.conv_blocks (4)"),
    ("model.kernel_size", 0, "model.kernel_size=0: must be >= 1"),
    ("model.pool_size", [2, 2, 2, 0], "model.pool_size=[2, 2, 2, 0]: must be >= 1, or a list"),
    ("model.pool_size", "2", "model.pool_size: must be an integer or a list, got '2'"),
    ("model.conv_dropout", "yes", "model.conv_dropout: must be true/false, got 'yes'"),
    ("model.dense_units", [-1], "model.dense_units=[-1]"),
    ("seed", True, "seed: must be an integer, got True"),
    ("seed", None, "seed: must be an integer, got null"),
    ("seed", -1, "seed=-1: must be >= 0 and < 2**32"),
    ("seed", 2**32, "seed=4294967296: must be >= 0 and < 2**32 (NumPy's seed range)"),
])
def test_bad_values_are_named(key, value, expected):
    with pytest.raises(ConfigError) as err:
        validate(params_with(**{key: value}))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_keys_rejected_at_any_depth_with_suggestion():
    params = copy.deepcopy(DEFAULT)
    params["train"]["keep_prop"] = 0.5
    params["train"]["early_stopping"]["patiense"] = 3
    params["extra"] = 1
    with pytest.raises(ConfigError) as err:
        validate(params)
    msg = str(err.value)
    assert "train.keep_prop: unknown key (did you mean train.keep_prob?)" in msg
    assert "train.early_stopping.patiense: unknown key (did you mean train.early_stopping.patience?)" in msg
    assert "extra: unknown key" in msg


def test_all_problems_reported_at_once_and_missing_keys():
    params = copy.deepcopy(DEFAULT)
    del params["train"]["batch_size"]
    params["train"]["keep_prob"] = 0
    params["data"] = "digits"
    msg = str(pytest.raises(ConfigError, validate, params).value)
    assert "train.batch_size: missing" in msg
    assert "train.keep_prob=0" in msg
    assert "data: must be a section" in msg


def test_each_family_checks_its_own_keys_and_the_image_size():
    params = params_with(**{"data.dataset": "folder", "data.image_size": 64})
    with pytest.raises(ConfigError, match="data.image_size=64: model.arch=report takes 32x32 images only"):
        validate(params)
    params["model"]["arch"] = "fast"
    validate(params)  # the fast family takes any size


def test_validation_never_imports_tensorflow(tmp_path):
    """config reads every plug-in's keys; validating must not wait for TensorFlow to load."""
    import subprocess
    import sys

    code = ("import sys; from imgclf.config import load_params; load_params(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "params.yaml")], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_nullables_accept_null_and_ints_count_as_numbers():
    params = validate(params_with(**{"data.path": None, "data.max_train_samples": None, "train.learning_rate": 1}))
    assert params["data"]["path"] is None and params["data"]["max_train_samples"] is None
    assert params["train"]["learning_rate"] == 1
    with pytest.raises(ConfigError, match="train.learning_rate: must be a number, got null"):
        validate(params_with(**{"train.learning_rate": None}))  # only the nullable keys take null


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 51\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_params(bad)


def test_overrides_apply_then_validate(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    params = load_params(path, ["train.learning_rate=0.0005", "model.dense_units=[]"])
    assert params["train"]["learning_rate"] == 0.0005 and params["model"]["dense_units"] == []
    with pytest.raises(ConfigError, match="train.learnig_rate: unknown key"):
        load_params(path, ["train.learnig_rate=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(path, ["train.learning_rate"])


def test_exponent_floats_are_numbers_like_in_dvc(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("learning_rate: 0.001", "learning_rate: 1e-4"))
    assert load_params(path)["train"]["learning_rate"] == 1e-4
    assert load_params(path, ["train.learning_rate=1E+2"])["train"]["learning_rate"] == 100.0


def test_flatten_uses_dots():
    flat = flatten(DEFAULT)
    assert flat["train.early_stopping.patience"] == 5
    assert flat["model.conv_blocks"] == [[64, 64], [128, 128], [256, 256], [512, 512, 512]]
    assert flat["seed"] == 51


def test_the_largest_seed_numpy_accepts_is_valid():
    assert validate(params_with(seed=2**32 - 1))["seed"] == 2**32 - 1


# --- params.yaml's `preset` switch (config.expand_preset) -----------------------------------------------------


def params_file(tmp_path, **changes):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_with(**changes), sort_keys=False))
    return path


def test_shipped_values_are_params_yaml_s_and_cover_every_key_a_preset_sets():
    from imgclf.experiments.presets import PRESETS, SHIPPED

    assert set(SHIPPED) == {"tracking.variant"}.union(*(p.overrides for p in PRESETS.values()))
    assert {key: flatten(DEFAULT)[key] for key in SHIPPED} == SHIPPED
    assert DEFAULT["preset"] is None  # the default run stays the report's


@pytest.mark.parametrize("name", ["fast_muon", "shallow_dropout", "no_256"])
def test_a_preset_expands_to_its_overrides_from_the_cli_or_the_file(tmp_path, name):
    from imgclf.config import parse_yaml
    from imgclf.experiments.presets import PRESETS

    by_cli = load_params(REPO / "params.yaml", [f"preset={name}"])
    by_file = load_params(params_file(tmp_path, preset=name))  # as `dvc exp run -S preset=...` leaves it
    assert by_cli == by_file
    flat = flatten(by_cli)
    assert {k: flat[k] for k in PRESETS[name].overrides} == {k: parse_yaml(v) for k, v in
                                                             PRESETS[name].overrides.items()}
    assert flat["preset"] == name and flat["tracking.variant"] == name  # logged as params and the variant tag
    untouched = set(flat) - set(PRESETS[name].overrides) - {"preset", "tracking.variant"}
    assert {k: flat[k] for k in untouched} == {k: flatten(DEFAULT)[k] for k in untouched}


def test_the_fast_muon_preset_is_what_imgclf_experiments_queues():
    from imgclf.experiments.command import queue_args

    args = queue_args("fast_muon", 51, [])
    queued = load_params(REPO / "params.yaml", [a for a in args[args.index("-S"):] if a != "-S"])
    assert load_params(REPO / "params.yaml", ["preset=fast_muon"]) == queued | {"preset": "fast_muon"}


def test_explicit_keys_win_over_the_preset(tmp_path):
    # imgclf -S: explicit wherever it comes in the list, even at the shipped value or for a whole section
    params = load_params(REPO / "params.yaml", ["train.training_epochs=2", "preset=fast_muon",
                                                "train.batch_size=128", "evaluate={tta: flip}"])
    assert (params["train"]["training_epochs"], params["train"]["batch_size"]) == (2, 128)
    assert params["evaluate"]["tta"] == "flip" and params["model"]["fast"]["optimizer"] == "muon"
    # dvc exp run -S (written into params.yaml) or an edit: any value other than the shipped one is someone's
    path = params_file(tmp_path, preset="fast_muon", **{"train.training_epochs": 2, "tracking.variant": "mine"})
    params = load_params(path)
    assert params["train"]["training_epochs"] == 2 and params["tracking"]["variant"] == "mine"
    assert params["train"]["batch_size"] == 2000 and params["model"]["arch"] == "fast"


def test_expansion_is_idempotent_so_a_logged_params_yaml_gives_the_same_run(tmp_path):
    once = load_params(REPO / "params.yaml", ["preset=fast", "train.training_epochs=3"])
    path = tmp_path / "logged.yaml"
    path.write_text(yaml.safe_dump(once, sort_keys=False))  # the params.yaml artifact a run logs
    assert load_params(path) == once


@pytest.mark.parametrize("value", ["fast-muon", "FAST", "", "fast_muon ", 3, ["fast"], {"a": 1}, True])
def test_an_unknown_preset_is_one_line_naming_the_culprit_and_the_valid_ones(tmp_path, value):
    from imgclf.experiments.presets import PRESETS

    with pytest.raises(ConfigError) as err:
        load_params(params_file(tmp_path, preset=value), ["train.training_epochs=2"])
    problems = str(err.value).split(": ", 1)[1].split(" -- fix ")[0]  # without the file's path
    assert "\n" not in problems and problems.startswith("preset") and problems.count("preset") == 1
    if isinstance(value, str):
        assert problems == f"preset={value!r}: must be one of {', '.join(PRESETS)}, or null"
    assert load_params(REPO / "params.yaml", ["preset=null"]) == load_params(REPO / "params.yaml")


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=20), st.sampled_from(["fast", "fast_muon", "no_512", "null", "~", "[fast]"])))
def test_any_preset_text_expands_or_is_refused_in_one_line(text):
    from imgclf.config import parse_yaml
    from imgclf.experiments.presets import PRESETS

    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        return  # refused as invalid YAML by the override parser (test_overrides_apply_then_validate)
    try:
        params = load_params(REPO / "params.yaml", [f"preset={text}"])
    except ConfigError as err:
        assert not (isinstance(value, str) and value in PRESETS) and "\n" not in str(err) and "preset" in str(err)
    else:
        assert value is None or params["model"] != DEFAULT["model"] or params["train"] != DEFAULT["train"]
