"""training.numerics.cpu_facts (imported as `machine`): the CPU model and the ISA flags oneDNN picks its kernels
from, recorded on every run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from imgclf.training import numerics as machine

AVX512 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16\n"
AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_the_isa_flags_tell_an_avx512_bf16_machine_from_an_avx2_one(monkeypatch):
    for name in machine.ONEDNN_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert machine.cpu_facts(AVX512) == {"cpu_model": "AMD EPYC 9R14", "cpu_isa": "avx2 avx512f avx512_bf16"}
    assert machine.cpu_facts(AVX2) == {"cpu_model": "AMD EPYC 7B12", "cpu_isa": "avx2"}


def test_onednn_switches_are_recorded_when_set(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert machine.cpu_facts(AVX512)["onednn_max_cpu_isa"] == "AVX2"
    assert "tf_enable_onednn_opts" not in machine.cpu_facts(AVX512)


def test_this_machines_facts_come_from_proc_cpuinfo():
    info = Path("/proc/cpuinfo").read_text()
    facts = machine.cpu_facts()
    assert facts["cpu_model"] in info
    flags = info.split("flags")[1].splitlines()[0].split()
    assert facts["cpu_isa"].split() == [f for f in machine.ISA_FLAGS if f in flags]


def test_tensorflows_onednn_ops_are_on_by_default_only_with_vnni_bf16_or_amx():
    """TensorFlow's own policy (DefaultOneDnnPolicy): the tests that expect oneDNN's ops in native mode take the
    expectation from this, so the suite holds on AVX2-only CPUs, where they are off."""
    assert machine.onednn_ops_by_default(AVX512) is True
    assert machine.onednn_ops_by_default(AVX2) is False
    alder_lake = AVX2.replace("fma", "fma avx_vnni")  # an AVX2-only Intel client core with AVX-VNNI
    assert machine.onednn_ops_by_default(alder_lake) is True
    assert machine.onednn_ops_by_default("") is False


def on_a_fresh_process(monkeypatch, **env: str) -> None:
    """The state `imgclf train` decides the kernel path in: TensorFlow not loaded yet, only `env`'s switches."""
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    for name in machine.ONEDNN_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_auto_kernels_are_onednns_on_every_avx2_cpu_where_tensorflow_would_run_eigens(monkeypatch):
    on_a_fresh_process(monkeypatch)
    assert machine.resolve_kernels("auto", "native", AVX512)[0] == "onednn"  # TensorFlow's own default there
    path, why = machine.resolve_kernels("auto", "native", AVX2)
    assert path == "onednn" and "Eigen" in why
    assert machine.resolve_kernels("auto", "native", "flags\t\t: fpu sse2 avx\n")[0] == "eigen"  # no AVX2
    # an explicit value is itself; portable runs its own kernels whatever is asked
    assert machine.resolve_kernels("eigen", "native", AVX2) == ("eigen", "train.kernels")
    assert machine.resolve_kernels("onednn", "portable", AVX2)[0] == "portable"


def test_auto_keeps_a_switch_set_in_the_environment_or_what_a_loaded_tensorflow_runs(monkeypatch):
    on_a_fresh_process(monkeypatch, TF_ENABLE_ONEDNN_OPTS="0")
    assert machine.resolve_kernels("auto", "native", AVX2) == ("eigen", "auto: TF_ENABLE_ONEDNN_OPTS=0")
    on_a_fresh_process(monkeypatch, TF_ENABLE_ONEDNN_OPTS="True")
    assert machine.resolve_kernels("auto", "native", AVX2)[0] == "onednn"
    on_a_fresh_process(monkeypatch, TF_ENABLE_ONEDNN_OPTS="maybe")  # TensorFlow ignores it: its default applies
    assert not machine.onednn_ops_on(AVX2) and machine.onednn_ops_on(AVX512)
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    assert machine.resolve_kernels("auto", "native", AVX2)[0] == "eigen"


def test_the_environment_sets_the_switch_only_where_tensorflows_default_is_not_the_path(monkeypatch):
    on_a_fresh_process(monkeypatch)
    monkeypatch.setattr(machine, "_cpuinfo", lambda: AVX2)
    monkeypatch.setattr(machine, "_CHOSEN", {})
    assert machine.kernels_env("native") == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert machine.kernels_env("native", "eigen") == {}
    assert machine.kernels_env("portable") == machine.NUMERICS_ENV["portable"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: AVX512)
    monkeypatch.setattr(machine, "_CHOSEN", {})
    assert machine.kernels_env("native") == {} and machine.kernels_env("native", "eigen") == {"TF_ENABLE_ONEDNN_OPTS": "0"}


@pytest.mark.parametrize("cap, flags", [
    ("AVX2", {"avx", "avx2", "fma", "fpu", "sse2"}),
    ("AVX512_CORE", {"avx", "avx2", "fma", "fpu", "sse2", "avx512f", "avx512bw"}),
    ("AVX512_CORE_BF16", {"avx", "avx2", "fma", "fpu", "sse2", "avx512f", "avx512bw", "avx512_bf16"}),
    ("ALL", {"avx", "avx2", "fma", "fpu", "sse2", "avx512f", "avx512bw", "avx512_bf16"}),
])
def test_an_isa_cap_hides_the_flags_above_it_from_every_choice(monkeypatch, cap, flags):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert machine.usable_flags(AVX512) == flags
    assert machine.bf16_native("onednn", gpu=False, cpuinfo=AVX512) is ("avx512_bf16" in flags)


def test_bfloat16_matmuls_are_native_only_through_onednn_on_bf16_hardware_or_a_gpu(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert machine.bf16_native("onednn", False, AVX512) and not machine.bf16_native("onednn", False, AVX2)
    assert not machine.bf16_native("eigen", False, AVX512) and not machine.bf16_native("portable", False, AVX512)
    assert machine.bf16_native("eigen", True, AVX2)
