"""The CPU's peak multiply-add rate, estimated, for "how far from the hardware's limit" figures.

peak FLOP/s = cores x clock x FLOP per core per cycle, where
- cores: os.cpu_count() (the benchmarks' machines have one thread per core; lscpu says so);
- clock: measured, not read: virtual machines often hide it (/proc/cpuinfo has no MHz here). A chain of
  dependent 64-bit integer adds runs at one add per cycle on every x86-64 core since the 1990s, so adds per
  second is the clock the core ran at. It is the single-core boost clock; under all-core vector load the clock
  can be lower, so the peak is an upper bound and percentages of it a lower bound;
- FLOP per cycle: two FMA pipes of 256 bits (AMD Zen 2-4, Intel client cores) give 2 x 8 float32 FMAs = 32
  FLOP; AVX-512 on Intel server cores has two 512-bit FMA pipes (64), on AMD Zen 4 it runs 512-bit FMAs
  through the same two 256-bit pipes (32). AVX-512 BF16's dot product (VDPBF16PS) does two bfloat16 products
  per float32 lane: twice the float32 rate. AMX is not estimated (its tile unit is another machine).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import time

ADDS_PER_LOOP = 10
# xor eax,eax; mov rcx,rdi; loop: 10 x (add rax,1); dec rcx; jnz loop; ret   (System V: rdi = iterations)
_CODE = (bytes.fromhex("31c0" "4889f9") + bytes.fromhex("4883c001") * ADDS_PER_LOOP
         + bytes.fromhex("48ffc9") + bytes([0x75, (-(4 * ADDS_PER_LOOP + 3 + 2)) & 0xFF]) + bytes.fromhex("c3"))


def clock_ghz(iterations: int = 100_000_000, repeats: int = 5) -> float | None:
    """This core's clock in GHz from a dependent add chain (None where executable memory is refused)."""
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, AttributeError, PermissionError):
        return None
    buf.write(_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    chain = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(address)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        chain(iterations)
        rates.append(iterations * ADDS_PER_LOOP / (time.perf_counter() - start) / 1e9)
    del chain
    return max(rates)  # the fastest repeat: the others lost time to interruptions, not to a slower clock


def flop_per_cycle(isa: list[str], vendor: str, precision: str) -> int:
    """FLOP per core per cycle for float32 ('none') or bfloat16 ('mixed_bfloat16') from the CPU's flags."""
    if "avx512f" in isa and vendor == "GenuineIntel":
        fp32 = 64
    elif "avx2" in isa:
        fp32 = 32
    else:
        fp32 = 16
    return 2 * fp32 if precision == "mixed_bfloat16" and "avx512_bf16" in isa else fp32


def vendor() -> str:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")),
                "unknown")


def peak_gflops(precision: str, ghz: float | None) -> float | None:
    """The estimated peak GFLOP/s of all cores in `precision` (None without a clock)."""
    from imgclf.training.numerics import cpu_facts

    if ghz is None:
        return None
    return os.cpu_count() * ghz * flop_per_cycle(cpu_facts()["cpu_isa"].split(), vendor(), precision)


if __name__ == "__main__":
    ghz = clock_ghz()
    print(f"clock {ghz:.2f} GHz (dependent adds); peak float32 {peak_gflops('none', ghz):.0f} GFLOP/s, "
          f"bfloat16 {peak_gflops('mixed_bfloat16', ghz):.0f} GFLOP/s ({os.cpu_count()} cores, {vendor()}); "
          f"repeats {statistics.median([clock_ghz(repeats=1) for _ in range(3)]):.2f} GHz")
