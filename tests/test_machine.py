"""training.numerics.cpu_facts (imported as `machine`): the CPU model and the ISA flags oneDNN picks its kernels
from, recorded on every run."""

from __future__ import annotations

from pathlib import Path

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
