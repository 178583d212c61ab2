"""Pin the cache sizes Eigen blocks its contractions by, so `train.numerics=portable` computes the same bits on
CPUs whose caches differ (measured: a Zen 3 with 512 KB of L2 a core and a Zen 4 with 1 MB gave two hashes,
and the same once Eigen's L2 was set alike; docs/reproducibility.md).

Eigen reads the L1/L2/L3 sizes from the CPU once, into the function-local static `m_cacheSizes` of
`Eigen::internal::manage_caching_sizes` (three int64), and derives its GEMM block sizes (and its tensor
executor's blocks) from them. TensorFlow's kernels use the copy in libtensorflow_cc.so.2, a LOCAL symbol: not
exported, so no dlsym. Its address is found here the robust way: the symbol's value in the library's own ELF
symbol table plus the load bias the dynamic linker reports for that very file. It is checked (24 bytes, its
guard says the static was initialised, the sizes it holds are plausible) before three int64 are written; a
build without it is refused in one line, never written at a guessed address. libtensorflow_framework.so.2 has
a copy of its own, first read when a graph runs (a Keras fit does): it is pinned too, with the same checks.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from imgclf.errors import ImgclfError

LIBRARY = "libtensorflow_cc.so.2"
# TensorFlow's framework library holds its own (exported, weak) copy, read once a graph runs: pinned alike.
FRAMEWORK = "libtensorflow_framework.so.2"
SIZES = b"_ZZN5Eigen8internal20manage_caching_sizesENS_6ActionEPlS2_S2_E12m_cacheSizes"
GUARD = b"_ZGVZN5Eigen8internal20manage_caching_sizesENS_6ActionEPlS2_S2_E12m_cacheSizes"  # its init guard
# l1, l2, l3 in bytes. l2 = 1 MB is the Zen 4's own (one L2 a core): portable runs there keep their bits.
PINNED = (32768, 1048576, 268435456)
# "l1,l2,l3": other sizes, to reproduce on this machine what another CPU computes (a Zen 3: 32768,524288,268435456).
SIZES_ENV = "IMGCLF_EIGEN_CACHE_SIZES"
# ELF64 Elf64_Sym, little-endian (x86-64).
SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
                ("size", "<u8")])
SHT_SYMTAB, STT_OBJECT, RTLD_DI_LINKMAP = 2, 1, 2


class PinError(ImgclfError):
    """Eigen's cache sizes cannot be pinned safely in this TensorFlow build."""


def chosen_sizes(env: dict | None = None) -> tuple[int, int, int]:
    """PINNED, or the sizes SIZES_ENV names (three positive integers, l1 <= l2 <= l3)."""
    text = (os.environ if env is None else env).get(SIZES_ENV)
    if text is None:
        return PINNED
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or not plausible(sizes):
        raise ImgclfError(f"{SIZES_ENV}={text!r} is not three cache sizes in bytes 'l1,l2,l3' with "
                          f"1024 <= l1 <= l2 <= l3 <= 2**40; e.g. {','.join(map(str, PINNED))}, or unset it")
    return sizes


def plausible(sizes) -> bool:
    return 1024 <= sizes[0] <= sizes[1] <= sizes[2] <= 2 ** 40


def loaded_path(name: str = LIBRARY, maps: Path = Path("/proc/self/maps")) -> Path | None:
    """The file this process mapped under `name`, or None."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    return next((Path(line.split(None, 5)[5]) for line in lines
                 if len(line.split(None, 5)) == 6 and Path(line.split(None, 5)[5]).name == name), None)


def symbols(path: Path, names: tuple[bytes, ...]) -> dict[bytes, tuple[int, int, int]]:
    """{name: (value, size, type)} for those of `names` in the ELF file's .symtab (local symbols included)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        if elf[:5] != b"\x7fELF\x02" or elf[5] != 1:
            raise PinError(f"{path} is not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
        found = {}
        for _, kind, _, _, offset, size, link, _, _, _ in sections:
            if kind == SHT_SYMTAB:
                found |= _lookup(elf, offset, size, sections[link], names)
        return found


def _lookup(elf, offset: int, size: int, strtab: tuple, names: tuple[bytes, ...]) -> dict:
    """The `names` among one symbol table's entries. A name may also end a longer one (linkers share tails)."""
    table = np.frombuffer(elf, SYM, size // SYM.itemsize, offset)
    str_start, str_end, found = strtab[4], strtab[4] + strtab[5], {}
    for name in names:
        at, starts = elf.find(name + b"\0", str_start, str_end), []
        while at >= 0:
            starts.append(at - str_start)
            at = elf.find(name + b"\0", at + 1, str_end)
        hits = table[np.isin(table["name"], starts)]
        if len(hits) == 1:
            found[name] = (int(hits["value"][0]), int(hits["size"][0]), int(hits["info"][0]) & 0xF)
    return found


def load_bias(path: Path) -> int:
    """Where the dynamic linker put `path` (its link_map's l_addr), asking for the loaded file, never loading it."""
    try:
        handle = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        raise PinError(f"{path.name} is not loaded in this process") from None
    link_map = ctypes.c_void_p()
    if ctypes.CDLL(None).dlinfo(ctypes.c_void_p(handle._handle), RTLD_DI_LINKMAP, ctypes.byref(link_map)) != 0:
        raise PinError(f"dlinfo cannot say where {path.name} is loaded")
    return ctypes.c_size_t.from_address(link_map.value).value


def warm_up() -> None:
    """One tiny convolution and matmul, eagerly and as a graph: Eigen reads the CPU's cache sizes into the
    kernels' static on their first product, and into the framework library's copy when a graph first runs."""
    import tensorflow as tf

    def product():
        return tf.matmul(tf.reshape(tf.nn.conv2d(tf.ones([1, 8, 8, 4]), tf.ones([3, 3, 4, 4]), 1, "SAME"), [8, 32]),
                         tf.ones([32, 8]))

    product().numpy()
    tf.function(product)().numpy()


def locate(path: Path | None = None) -> int:
    """The address of the three sizes in the loaded library, checked; PinError naming why otherwise."""
    path = path or loaded_path()
    if path is None:
        raise PinError(f"{LIBRARY} is not loaded in this process")
    found = symbols(path, (SIZES, GUARD))
    if SIZES not in found or GUARD not in found:
        raise PinError(f"{path.name} has no symbol {SIZES.decode()} (or its guard) in its symbol table")
    value, size, kind = found[SIZES]
    if size != 24 or kind != STT_OBJECT:
        raise PinError(f"{SIZES.decode()} in {path.name} is {size} bytes of type {kind}, not 3 int64")
    bias = load_bias(path)
    if ctypes.c_uint8.from_address(bias + found[GUARD][0]).value == 0:
        raise PinError(f"Eigen's cache sizes in {path.name} were not initialised by a first convolution")
    current = tuple((ctypes.c_int64 * 3).from_address(bias + value))
    if not plausible(current):
        raise PinError(f"Eigen's cache sizes in {path.name} read {list(current)}, not cache sizes")
    return bias + value


def other_copies() -> list[int]:
    """The checked addresses of the framework library's copy, where it has one (a build without it reads none)."""
    path = loaded_path(FRAMEWORK)
    if path is None or SIZES not in symbols(path, (SIZES,)):
        return []
    return [locate(path)]


def pin(sizes: tuple[int, int, int], path: Path | None = None) -> None:
    """Run the warm-up, then write `sizes` into every copy of Eigen's static (the kernels' in `path`, by default
    the loaded LIBRARY, must be there); one line and nothing written if any is not what it should be."""
    warm_up()
    try:
        addresses = [locate(path), *other_copies()]
    except (PinError, OSError, ValueError, struct.error) as exc:  # a missing or malformed library
        raise PinError(f"train.numerics=portable cannot pin Eigen's cache sizes in {build()}: {exc}; train with "
                       f"train.numerics=native, or use the TensorFlow 2.21 wheel requirements.lock pins") from None
    for address in addresses:
        (ctypes.c_int64 * 3).from_address(address)[:] = sizes


def build() -> str:
    """The TensorFlow build, as a refusal names it."""
    import tensorflow as tf

    return f"TensorFlow {tf.__version__} ({tf.version.GIT_VERSION}, {LIBRARY})"
