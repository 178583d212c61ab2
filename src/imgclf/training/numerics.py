"""What decides the numbers a training run computes: the kernels TensorFlow picks (train.numerics) and the CPU
facts they depend on, seeds, op determinism, TF32 and mixed precision. The one owner of the oneDNN switches.

TensorFlow's CPU convolutions and matmuls go through oneDNN, which picks its kernels at run time from the
CPU's instruction sets (AVX2, AVX-512, AVX-512 BF16, AMX), and different kernels sum in different orders.
So the CPU model and those flags belong next to the library versions on every run (cpu_facts): two runs that
differ there can differ in their weights with nothing else changed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path

from imgclf.errors import ImgclfError

# train.numerics -> the environment TensorFlow has to start with. `native` takes the fastest kernels for this
# CPU: oneDNN's, chosen at run time from its instruction sets (AVX2, AVX-512, BF16, AMX) and summing in their
# own orders, so weights differ between CPU kinds. `portable` turns oneDNN's ops and the oneDNN sgemm inside
# Eigen's contractions off, leaving Eigen code compiled into the wheel (AVX, no FMA: the same instructions on
# every x86-64 CPU). One TensorFlow kernel calls oneDNN's sgemm directly whatever the switches say
# (Conv2DBackpropInput's matmul), so oneDNN is capped at AVX2, the kernel it runs on any CPU with AVX2.
# Threads are fixed because Eigen and oneDNN split work by the thread count. Eigen's block sizes follow the
# cache sizes it reads from the CPU, so portable pins those too once TensorFlow runs (pin_kernels, eigen_cache.py).
PORTABLE_THREADS = "2"
NUMERICS_ENV = {
    "native": {},
    "portable": {"TF_ENABLE_ONEDNN_OPTS": "0", "TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL": "0",
                 "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "TF_NUM_INTRAOP_THREADS": PORTABLE_THREADS, "TF_NUM_INTEROP_THREADS": PORTABLE_THREADS},
}

# The flags that decide which oneDNN kernels run, oldest first.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# Either gives oneDNN bfloat16 multiply-adds at twice float32's rate: what train.mixed_precision=auto looks for.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# TensorFlow's Linux wheels turn their oneDNN ops on by default only on a CPU with one of these (DefaultOneDnnPolicy
# in TensorFlow's util.cc); elsewhere, AVX2-only CPUs included, Eigen's kernels run unless TF_ENABLE_ONEDNN_OPTS=1.
ONEDNN_DEFAULT_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# ONEDNN_MAX_CPU_ISA -> the prefixes of the CPU flags above that cap (ALL, AMX and unknown values leave them all).
_PAST_AVX2 = ("avx512", "avx_vnni", "amx")
ISA_CAPS = {"SSE41": ("avx", "fma", "amx"), "AVX": ("avx2", "fma", *_PAST_AVX2), "AVX2": _PAST_AVX2,
            "AVX2_VNNI": ("avx512", "amx"), "AVX2_VNNI_2": ("avx512", "amx"),
            "AVX512_CORE": ("avx512_vnni", "avx512_bf16", "avx512_fp16", "amx"),
            "AVX512_CORE_VNNI": ("avx512_bf16", "avx512_fp16", "amx"), "AVX512_CORE_BF16": ("avx512_fp16", "amx"),
            "AVX10_1_512": ("amx",)}
KERNELS = ("auto", "onednn", "eigen")  # train.kernels (resolve_kernels)
# Environment switches that change which kernels run or how work is split: those `portable` sets (recorded on
# every run when set).
ONEDNN_SWITCHES = tuple(NUMERICS_ENV["portable"])


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
    flags = cpu_flags("\n".join(lines))
    isa = " ".join(f for f in ISA_FLAGS if f in flags) if flags else "unknown"
    switches = {name.lower(): os.environ[name] for name in ONEDNN_SWITCHES if name in os.environ}
    return {"cpu_model": model, "cpu_isa": isa or "none of " + "/".join(ISA_FLAGS), **switches}

def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (or `cpuinfo`); empty where the file says nothing."""
    lines = (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines()
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def usable_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's flags less those above ONEDNN_MAX_CPU_ISA's cap: what oneDNN's kernels, and every choice made
    from them (bfloat16, the kernel path), can use here. The cap is how an AVX2-only CPU is imitated."""
    above = ISA_CAPS.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper(), ())
    return {flag for flag in cpu_flags(cpuinfo) if not flag.startswith(above)}


def onednn_ops_by_default(cpuinfo: str | None = None) -> bool:
    """Whether TensorFlow turns its oneDNN ops on for this CPU when TF_ENABLE_ONEDNN_OPTS is not set (it reads
    the CPU itself, whatever ONEDNN_MAX_CPU_ISA says)."""
    return bool(cpu_flags(cpuinfo) & set(ONEDNN_DEFAULT_FLAGS))


def _switch(value: str | None) -> bool | None:
    """TF_ENABLE_ONEDNN_OPTS as TensorFlow reads it: 1/true on, 0/false off, anything else its default."""
    return {"1": True, "true": True, "0": False, "false": False}.get((value or "").strip().lower())


def onednn_ops_on(cpuinfo: str | None = None) -> bool:
    """Whether a TensorFlow started with this process's environment runs its oneDNN ops."""
    switch = _switch(os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
    return onednn_ops_by_default(cpuinfo) if switch is None else switch


def resolve_kernels(name: str, mode: str, cpuinfo: str | None = None) -> tuple[str, str]:
    """(path, why) for train.kernels=`name` under train.numerics=`mode`: onednn, eigen or portable.

    auto is oneDNN's ops on every CPU with AVX2. TensorFlow turns them on by itself only with AVX-512 VNNI/BF16
    or AMX; on an AVX2-only CPU it runs Eigen's convolutions, where the fast_muon step took 1.9x as long
    (docs/performance.md). A TF_ENABLE_ONEDNN_OPTS set in the environment is someone's choice and is kept, and
    so is what a TensorFlow loaded before the choice (a notebook's) runs."""
    if mode == "portable":
        return "portable", "train.numerics=portable runs its own kernels"
    if name != "auto":
        return name, "train.kernels"
    if "tensorflow" in sys.modules:
        return ("onednn" if onednn_ops_on(cpuinfo) else "eigen"), "auto: as the TensorFlow already loaded runs"
    switch = _switch(os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
    if switch is not None:
        return ("onednn" if switch else "eigen"), f"auto: TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}"
    if onednn_ops_by_default(cpuinfo):
        return "onednn", "auto: TensorFlow's default on this CPU"
    if "avx2" in usable_flags(cpuinfo):
        return "onednn", ("auto: TensorFlow would leave them off on this CPU (no AVX-512 VNNI/BF16 or AMX) and run "
                          "Eigen's, which are slower (docs/performance.md)")
    return "eigen", "auto: no AVX2, TensorFlow's default"


_CHOSEN: dict[tuple[str, str], tuple[str, str]] = {}


def chosen_kernels(mode: str, kernels: str = "auto") -> tuple[str, str]:
    """resolve_kernels on this machine, once per process: setting up TensorFlow sets TF_ENABLE_ONEDNN_OPTS,
    and the reason reported is the one that chose it."""
    return _CHOSEN.setdefault((mode, kernels), resolve_kernels(kernels, mode))


def bf16_native(path: str, gpu: bool, cpuinfo: str | None = None) -> bool:
    """Whether bfloat16 matmuls run on bfloat16 hardware: on a GPU, or through oneDNN on a CPU with bf16
    instructions. Elsewhere TensorFlow emulates them, several times slower than float32."""
    return gpu or (path == "onednn" and bool(usable_flags(cpuinfo) & set(BF16_FLAGS)))


def kernels_env(mode: str, kernels: str = "auto") -> dict[str, str]:
    """What TensorFlow has to start with for train.numerics=`mode` and train.kernels=`kernels`: portable's
    environment, or the oneDNN switch where TensorFlow's own choice on this CPU differs from the path's."""
    if mode == "portable":
        return NUMERICS_ENV[mode]
    wanted = chosen_kernels(mode, kernels)[0] == "onednn"
    return {} if onednn_ops_on() == wanted else {"TF_ENABLE_ONEDNN_OPTS": "1" if wanted else "0"}


def numerics_ready(mode: str, kernels: str = "auto") -> bool:
    """Whether this process's TensorFlow runs (or will run) with `mode`'s kernels: not loaded yet, or loaded with
    nothing of kernels_env left to set."""
    return "tensorflow" not in sys.modules or all(os.environ.get(k) == v for k, v in kernels_env(mode, kernels).items())


def use_numerics(mode: str, kernels: str = "auto") -> None:
    """Give TensorFlow `mode`'s environment; it reads it once, so this has to happen before it is imported."""
    env = kernels_env(mode, kernels)
    if not numerics_ready(mode, kernels):
        settings = " ".join(f"{k}={v}" for k, v in env.items())
        asked = f"train.numerics={mode}" + (f" with train.kernels={kernels}" if mode != "portable" else "")
        raise ImgclfError(f"{asked} needs TensorFlow started with {settings}, but this process imported it without; "
                          f"run `imgclf train` (it sets them) or set them before Python starts")
    os.environ.update(env)


def restart_with_numerics(mode: str, kernels: str = "auto") -> None:
    """Re-execute this command with `mode`'s environment when TensorFlow is already loaded without it (a
    rerun learns the mode from MLflow after importing it); otherwise just set it."""
    if not numerics_ready(mode, kernels):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **kernels_env(mode, kernels)})
    use_numerics(mode, kernels)


def pin_kernels(mode: str) -> dict[str, str]:
    """What `mode` fixes once TensorFlow is loaded, as tags for the run (and the checkpoint's fingerprint):
    under portable, Eigen's cache sizes (eigen_cache.py; one line and no training where they cannot be)."""
    if mode != "portable":
        return {}
    from imgclf.training import eigen_cache

    sizes = eigen_cache.chosen_sizes()
    eigen_cache.pin(sizes)
    return {"eigen_cache_sizes": " ".join(map(str, sizes))}


def seed_everything(seed: int, jit_compile: bool = False, tf32: bool = False) -> None:
    """Seed Python, NumPy and TF from params.yaml (never the clock); make TF ops deterministic unless XLA;
    allow TF32 matmuls and convolutions only when asked.

    Keras silently turns XLA off while op determinism is on (not every XLA kernel is deterministic),
    so train.jit_compile=true has to trade bit-identical reruns for its speed. TensorFlow enables TF32
    by default on Ampere and newer GPUs (10-bit mantissas in matmuls and convolutions); the report's net
    ran in float32, and with TF32 its default seed collapsed to one class on an H200.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_tensor_float_32_execution(tf32)
    if not jit_compile:
        tf.config.experimental.enable_op_determinism()


def resolve_precision(name: str, path: str, gpu: bool, cpuinfo: str | None = None) -> tuple[str, str]:
    """(policy, why) for train.mixed_precision=`name` on the kernel path `path` (resolve_kernels); any other
    value than `auto` is itself.

    auto is mixed_bfloat16 where bfloat16 runs on bfloat16 hardware through oneDNN (twice the multiply-add rate;
    the fast presets keep their accuracy there, docs/performance.md) and float32 elsewhere: on a CPU without
    bf16 instructions or with oneDNN capped below them (TensorFlow would emulate bf16, slower than float32), on
    Eigen's kernels (train.kernels=eigen) and under train.numerics=portable (no CPU-specific kernels), and on a
    GPU, where the fast presets have always trained in float32.
    """
    if name != "auto":
        return name, "train.mixed_precision"
    if gpu:
        return "none", "auto: float32 on a GPU"
    if path != "onednn":
        return "none", f"auto: {path} kernels keep float32"
    found = [flag for flag in BF16_FLAGS if flag in usable_flags(cpuinfo)]
    if found:
        return "mixed_bfloat16", f"auto: this CPU has {found[0]}"
    if set(BF16_FLAGS) & cpu_flags(cpuinfo):
        return "none", f"auto: ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')} keeps oneDNN below bfloat16"
    return "none", f"auto: this CPU has no bfloat16 instructions ({' or '.join(BF16_FLAGS)}), float32"


@contextlib.contextmanager
def precision_policy(name: str):
    """Layers built inside get Keras' `mixed_float16`/`mixed_bfloat16` policy (`none`: float32).

    The global policy is restored afterwards: each layer keeps its own policy, and nothing built
    later (the inference copy, other tests) should inherit it by accident.
    """
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if name == "none" else name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
