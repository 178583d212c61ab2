"""Eigen's cache sizes under train.numerics=portable (imgclf.training.eigen_cache): found in the loaded library's own
ELF symbol table, checked before anything is written, refused in one line where the build lacks them; and the
pin decides the bits: another L2 gives other weights, the same pin the same weights in two processes."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from mlflow.tracking import MlflowClient

from conftest import TINY, pipeline_env, run, set_args
from imgclf.errors import ImgclfError
from imgclf.training import eigen_cache

TENSORFLOW = Path(importlib.util.find_spec("tensorflow").submodule_search_locations[0])
ZEN3 = "32768,524288,268435456"  # what Eigen reads on an AMD EPYC Zen 3 (512 KB of L2 a core)
# TINY with a 256 -> 512 convolution at 4x4 in a batch of 128, the report net's shape whose input gradient Eigen
# blocks by L2 (measured: no smaller TINY shape here felt 512 KB against 1 MB).
FEELS_L2 = TINY | {"model.conv_blocks": "[[8], [16], [256], [512]]"}

# A stand-in for libtensorflow_cc.so.2: the two statics under Eigen's names, made to order (exported, so the test
# can ask dlsym where the loader put them and compare).
STAND_IN = """
long long sizes[{count}] __asm__("{sizes}") = {{{values}}};
unsigned long long guard __asm__("{guard}") = {guard_value};
"""


def stand_in(tmp_path: Path, name: str, count: int = 3, values: str = "32768, 524288, 268435456",
             guard: int = 1, symbols: bool = True) -> tuple[Path, ctypes.CDLL]:
    """A shared library compiled and loaded into this process: its path and handle."""
    source, lib = tmp_path / f"{name}.c", tmp_path / f"lib{name}.so"
    source.write_text(STAND_IN.format(count=count, values=values, guard_value=guard, sizes=eigen_cache.SIZES.decode(),
                                      guard=eigen_cache.GUARD.decode()) if symbols else "int unrelated = 1;\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True, capture_output=True)
    return lib, ctypes.CDLL(str(lib))


def test_the_symbol_is_in_tensorflows_own_symbol_table_as_three_int64():
    found = eigen_cache.symbols(TENSORFLOW / eigen_cache.LIBRARY, (eigen_cache.SIZES, eigen_cache.GUARD))
    assert found[eigen_cache.SIZES][1:] == (24, eigen_cache.STT_OBJECT)
    assert found[eigen_cache.GUARD][1] == 8


def test_a_library_with_the_symbol_is_located_where_the_loader_put_it(tmp_path):
    path, lib = stand_in(tmp_path, "good")
    assert eigen_cache.loaded_path(path.name) == path
    assert eigen_cache.locate(path) == ctypes.addressof(ctypes.c_int64.in_dll(lib, eigen_cache.SIZES.decode()))


@pytest.mark.parametrize("kwargs, why", [
    ({"symbols": False}, "has no symbol _ZZN5Eigen8internal20manage_caching_sizes"),
    ({"count": 2, "values": "32768, 524288"}, "is 16 bytes of type 1, not 3 int64"),
    ({"guard": 0}, "were not initialised by a first convolution"),
    ({"values": "0, 0, 0"}, "read [0, 0, 0], not cache sizes"),
    ({"values": "1048576, 32768, 268435456"}, "read [1048576, 32768, 268435456], not cache sizes"),
])
def test_a_library_without_a_usable_symbol_is_refused_before_anything_is_written(tmp_path, kwargs, why):
    path, _ = stand_in(tmp_path, "bad", **kwargs)
    with pytest.raises(eigen_cache.PinError) as caught:
        eigen_cache.locate(path)
    assert why in str(caught.value) and "\n" not in str(caught.value)


def test_a_library_that_is_not_loaded_is_refused(tmp_path):
    source, path = tmp_path / "idle.c", tmp_path / "libidle.so"
    source.write_text("int unrelated = 1;\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(path), str(source)], check=True, capture_output=True)
    assert eigen_cache.loaded_path(path.name) is None
    with pytest.raises(eigen_cache.PinError, match="libidle.so is not loaded in this process"):
        eigen_cache.load_bias(path)


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_the_sizes_variable_is_three_plausible_sizes_or_one_line(text):
    try:
        sizes = eigen_cache.chosen_sizes({eigen_cache.SIZES_ENV: text})
    except ImgclfError as exc:
        assert "\n" not in str(exc) and eigen_cache.SIZES_ENV in str(exc)
    else:
        assert len(sizes) == 3 and eigen_cache.plausible(sizes)


def test_the_chosen_sizes_are_the_default_and_the_variable_overrides_them():
    assert eigen_cache.chosen_sizes({}) == (32768, 1048576, 268435456)
    assert eigen_cache.chosen_sizes({eigen_cache.SIZES_ENV: ZEN3}) == (32768, 524288, 268435456)


# Pin in a fresh process in portable mode, then read every copy back.
PINNED = """
import ctypes, json, sys
from imgclf.training import eigen_cache
from imgclf.training.numerics import use_numerics
use_numerics("portable")
import tensorflow
eigen_cache.pin(eigen_cache.chosen_sizes())
print(json.dumps({lib: list((ctypes.c_int64 * 3).from_address(eigen_cache.locate(eigen_cache.loaded_path(lib))))
                  for lib in (eigen_cache.LIBRARY, eigen_cache.FRAMEWORK)}))
"""


def test_every_copy_of_the_static_holds_the_pinned_sizes_the_kernels_and_the_frameworks():
    """The framework library's copy is first read when a graph runs (a Keras fit): the warm-up runs one, so it is
    initialised, checked and pinned like the kernels' copy."""
    proc = subprocess.run([sys.executable, "-c", PINNED], capture_output=True, text=True, timeout=300,
                          env=pipeline_env(**{eigen_cache.SIZES_ENV: ZEN3}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {eigen_cache.LIBRARY: [32768, 524288, 268435456],
                                       eigen_cache.FRAMEWORK: [32768, 524288, 268435456]}


# `imgclf train` with the lookup pointed at a loaded stand-in that lacks the symbol, as a build without it would be.
REFUSED = """
import ctypes, sys
from pathlib import Path
from imgclf.training import eigen_cache
ctypes.CDLL(sys.argv[1])
eigen_cache.loaded_path = lambda name=None: Path(sys.argv[1])
from imgclf.cli import main
sys.exit(main(sys.argv[2:]))
"""


def trained_hash(repo: Path, **env: str) -> tuple[str, dict]:
    """Portable TINY training in a fresh process with `env` added: (weights sha256, the run's tags)."""
    run(["imgclf", *set_args(FEELS_L2 | {"train.numerics": "portable"}), "train"], repo, env=pipeline_env(**env))
    run_id = json.loads((repo / "reports/run.json").read_text())["mlflow_run_id"]
    tags = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id).data.tags
    return json.loads((repo / "reports/train.json").read_text())["weights_sha256"], tags


@pytest.mark.long(60)
@pytest.mark.e2e
def test_the_pinned_sizes_decide_the_bits_and_a_build_without_them_is_refused(prepared_copy, tmp_path):
    chosen, tags = trained_hash(prepared_copy)
    assert tags["eigen_cache_sizes"] == "32768 1048576 268435456"
    assert trained_hash(prepared_copy)[0] == chosen  # another process, the same pin: the same bits
    zen3, tags = trained_hash(prepared_copy, **{eigen_cache.SIZES_ENV: ZEN3})
    assert zen3 != chosen and tags["eigen_cache_sizes"] == "32768 524288 268435456"
    (prepared_copy / "reports/train.json").unlink()
    path, _ = stand_in(tmp_path, "nosymbol", symbols=False)
    refused = subprocess.run([sys.executable, "-c", REFUSED, str(path), *set_args(TINY | {
        "train.numerics": "portable"}), "train"], cwd=prepared_copy, env=pipeline_env(), capture_output=True,
        text=True, timeout=300)
    import tensorflow as tf

    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert (f"train.numerics=portable cannot pin Eigen's cache sizes in TensorFlow {tf.__version__} "
            f"({tf.version.GIT_VERSION}, libtensorflow_cc.so.2): {path.name} has no symbol ") in refused.stderr
    assert not (prepared_copy / "reports/train.json").exists()
