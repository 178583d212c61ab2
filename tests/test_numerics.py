"""train.numerics (imgclf.training.numerics): portable mode starts TensorFlow without any kernel chosen from the CPU's
instruction sets, so capping oneDNN's ISA no longer changes the weights; a process whose TensorFlow started
otherwise is refused; `imgclf rerun` of a portable run trains in that mode (set before TensorFlow is imported,
or by starting the command again once it was)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, pipeline_env, run, set_args
from imgclf import rerun
from imgclf.training.numerics import cpu_facts, onednn_ops_by_default, resolve_precision
from imgclf.training.numerics import NUMERICS_ENV

# What a fresh process reports: the mode's variables as TensorFlow sees them, and whether oneDNN's ops are on.
PROBE = """
import json, os, sys
from imgclf.training.numerics import use_numerics
{before}
use_numerics(*sys.argv[1:])
from tensorflow.python.util import _pywrap_util_port
print(json.dumps({{"onednn_ops": _pywrap_util_port.IsMklEnabled(),
                  "env": {{k: os.environ.get(k) for k in {names!r}}}}}))
"""
NAMES = sorted(NUMERICS_ENV["portable"])


def probe(mode: str, before: str = "", kernels: str = "auto") -> subprocess.CompletedProcess:
    env = {k: v for k, v in pipeline_env().items() if k not in NAMES}
    return subprocess.run([sys.executable, "-c", PROBE.format(before=before, names=NAMES), mode, kernels],
                          capture_output=True, text=True, env=env, timeout=300)


# What native's oneDNN switch is set to, where TensorFlow's own default (by the CPU: on with AVX-512 VNNI/BF16 or
# AMX, off on AVX2-only CPUs) is not the path asked for.
SWITCH = {"onednn": None if onednn_ops_by_default() else "1", "eigen": "0" if onednn_ops_by_default() else None}


def test_portable_turns_onednn_off_and_fixes_the_threads_native_runs_onednn_on_every_avx2_cpu():
    portable, native = probe("portable"), probe("native")
    assert json.loads(portable.stdout) == {"onednn_ops": False, "env": NUMERICS_ENV["portable"]}
    # native's train.kernels=auto is oneDNN's ops wherever the CPU has AVX2, switched on where TensorFlow would not
    assert json.loads(native.stdout) == {"onednn_ops": True,
                                         "env": dict.fromkeys(NAMES) | {"TF_ENABLE_ONEDNN_OPTS": SWITCH["onednn"]}}
    eigen = probe("native", kernels="eigen")
    assert json.loads(eigen.stdout) == {"onednn_ops": False,
                                        "env": dict.fromkeys(NAMES) | {"TF_ENABLE_ONEDNN_OPTS": SWITCH["eigen"]}}


RESTART = """
import os, sys, types
print("started", os.environ.get("TF_ENABLE_ONEDNN_OPTS"), flush=True)
sys.modules["tensorflow"] = types.ModuleType("tensorflow")  # as if imported: its kernels are chosen
from imgclf.training.numerics import restart_with_numerics
restart_with_numerics(sys.argv[1])
print("ready", os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
"""


def test_restart_starts_the_command_again_with_the_modes_environment_once_tensorflow_is_loaded(tmp_path):
    script = tmp_path / "restart.py"
    script.write_text(RESTART)
    env = {k: v for k, v in pipeline_env().items() if k not in NAMES}

    def starts(mode: str) -> list[str]:
        return subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                              timeout=60, check=True).stdout.splitlines()

    assert starts("portable") == ["started None", "started 0", "ready 0"]
    switch = SWITCH["onednn"]  # nothing to change where TensorFlow's default is the path: no second start
    assert starts("native") == (["started None", "ready None"] if switch is None else
                                ["started None", f"started {switch}", f"ready {switch}"])


def test_portable_is_refused_once_tensorflow_started_with_other_kernels():
    late = probe("portable", before="import tensorflow")
    assert late.returncode != 0 and late.stdout == ""
    last = late.stderr.strip().splitlines()[-1]
    assert last.startswith("imgclf.errors.ImgclfError: train.numerics=portable needs TensorFlow started with "
                           "TF_ENABLE_ONEDNN_OPTS=0 ")
    # auto takes what the TensorFlow already loaded runs; an explicit path it does not run is refused
    assert json.loads(probe("native", before="import tensorflow").stdout)["onednn_ops"] is onednn_ops_by_default()
    other = "eigen" if onednn_ops_by_default() else "onednn"
    refused = probe("native", before="import tensorflow", kernels=other)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith(
        f"imgclf.errors.ImgclfError: train.numerics=native with train.kernels={other} needs TensorFlow started with "
        f"TF_ENABLE_ONEDNN_OPTS={'0' if other == 'eigen' else '1'}")


def test_a_rerun_diff_names_the_numerics_mode_and_its_variables(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("t", artifact_location=str(tmp_path / "mlruns"))
    runs = [client.create_run(experiment, tags={"weights_sha256": weights, **tags}).info.run_id for weights, tags in
            [("a" * 64, {"numerics": "native"}), ("b" * 64, {"numerics": "portable", "tf_enable_onednn_opts": "0",
                                                             "tf_num_intraop_threads": "2"})]]
    match, lines = rerun.compare(client, client.get_run(runs[0]), runs[1])
    assert not match and lines[2:] == ["  environment differs: numerics: native -> portable",
                                       "  environment differs: tf_enable_onednn_opts: None -> 0",
                                       "  environment differs: tf_num_intraop_threads: None -> 2"]


def trained_hash(repo, mode: str, **env: str) -> tuple[str, str]:
    """`imgclf train` in a fresh process with `env` added; (weights sha256, MLflow run id)."""
    run(["imgclf", *set_args(TINY | {"train.numerics": mode}), "train"], repo, env=pipeline_env(**env))
    run_id = json.loads((repo / "reports/run.json").read_text())["mlflow_run_id"]
    return json.loads((repo / "reports/train.json").read_text())["weights_sha256"], run_id


@pytest.mark.long(72)
@pytest.mark.e2e
def test_portable_weights_do_not_depend_on_onednns_isa_and_rerun_trains_in_that_mode(trained, prepared_copy):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN pick what it would on an AVX2-only CPU: native weights change with it
    on an AVX-512 machine (the ISA is felt). Portable sets its own cap, so what the shell asks must not matter."""
    portable, run_id = trained_hash(prepared_copy, "portable")
    assert trained_hash(prepared_copy, "portable", ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")[0] == portable
    # TINY in native mode with no ISA cap on this data: the session's shared run (conftest.trained) is that training.
    native = json.loads((trained.repo / "reports/train.json").read_text())["weights_sha256"]
    capped = trained_hash(prepared_copy, "native", ONEDNN_MAX_CPU_ISA="AVX2")[0]
    assert native != portable
    # the cap is felt where oneDNN would pick more than AVX2, unless the shell caps it already (an emulated AVX2 CPU)
    if "avx512f" in cpu_facts()["cpu_isa"] and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        assert capped != native
    tags = MlflowClient(f"sqlite:///{prepared_copy / 'mlflow.db'}").get_run(run_id).data.tags
    assert (tags["numerics"], tags["tf_enable_onednn_opts"], tags["onednn_max_cpu_isa"],
            tags["tf_num_intraop_threads"]) == ("portable", "0", "AVX2", "2")
    # the shell has no portable variables: rerun learns the mode from the run before TensorFlow starts
    rerun = run(["imgclf", "rerun", run_id], prepared_copy)
    assert "MATCH: weights sha256 " + portable in rerun.stdout


CPUINFO = "model name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n"


@pytest.mark.parametrize("flags, path, gpu, expected", [
    ("avx2 avx512f avx512_bf16", "onednn", False, "mixed_bfloat16"),
    ("avx2 avx512f amx_bf16", "onednn", False, "mixed_bfloat16"),
    ("avx2 avx512f", "onednn", False, "none"),           # no bf16 in hardware: TensorFlow would emulate it
    ("avx2", "onednn", False, "none"),
    ("avx2 avx512f avx512_bf16", "eigen", False, "none"),     # Eigen's kernels emulate bf16
    ("avx2 avx512f avx512_bf16", "portable", False, "none"),  # portable turns the bf16 kernels off
    ("avx2 avx512f avx512_bf16", "onednn", True, "none"),     # the fast presets train in float32 on GPUs
])
def test_auto_precision_is_bfloat16_only_on_a_cpu_with_bfloat16_instructions(flags, path, gpu, expected, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the emulated AVX2 shell's cap: tested on its own
    policy, why = resolve_precision("auto", path, gpu, CPUINFO.format(flags=flags))
    assert policy == expected and why.startswith("auto: ")
    # An explicit choice is kept whatever the machine.
    assert resolve_precision("mixed_float16", path, gpu, CPUINFO.format(flags=flags))[0] == "mixed_float16"
    assert resolve_precision("none", path, gpu, CPUINFO.format(flags=flags))[0] == "none"


def test_an_onednn_isa_cap_below_bfloat16_makes_auto_float32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU's path): oneDNN has no bf16 kernels, so auto must not ask for them
    (it did, and oneDNN aborted the process on a bf16 matmul it could not build)."""
    bf16 = CPUINFO.format(flags="avx2 avx512f avx512_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    policy, why = resolve_precision("auto", "onednn", False, bf16)
    assert policy == "none" and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # a cap at or above bf16 leaves it
    assert resolve_precision("auto", "onednn", False, bf16)[0] == "mixed_bfloat16"
