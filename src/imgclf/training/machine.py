"""What this CPU is, as far as the numbers a run computes are concerned.

TensorFlow's CPU convolutions and matmuls go through oneDNN, which picks its kernels at run time from the
CPU's instruction sets (AVX2, AVX-512, AVX-512 BF16, AMX), and different kernels sum in different orders.
So the CPU model and those flags belong next to the library versions on every run: two runs that differ
there can differ in their weights with nothing else changed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that decide which oneDNN kernels run, oldest first.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# Environment switches that change which kernels run or how work is split (recorded when set; train.numerics
# sets the last four).
ONEDNN_SWITCHES = ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS", "TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL",
                   "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        return path.read_text()
    except OSError:  # not Linux, or hidden: the facts say unknown
        return ""


def cpu_facts(cpuinfo: str | None = None) -> dict[str, str]:
    """{'cpu_model': ..., 'cpu_isa': 'avx2 avx512f ...'} from /proc/cpuinfo (or `cpuinfo`), plus any oneDNN
    switch set in the environment; 'unknown' where the file says nothing."""
    lines = (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    isa = " ".join(f for f in ISA_FLAGS if f in flags) if flags else "unknown"
    switches = {name.lower(): os.environ[name] for name in ONEDNN_SWITCHES if name in os.environ}
    return {"cpu_model": model, "cpu_isa": isa or "none of " + "/".join(ISA_FLAGS), **switches}
