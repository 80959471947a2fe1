"""CPU expert kernels: FP8 (128x128 block scales), BF16, INT4, and the 4-bit formats as
checkpoints store them (MXFP4, NVFP4, compressed-tensors INT4): GEMV/GEMM and the fused
routed-expert MLP, compiled once per CPU variant and chosen at import.

Public entry points take and return numpy arrays and check what they are given; the compiled
modules (_avx512, _avx2, _generic, _avx512_emulated) trust their arguments.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import cache, lru_cache
from types import ModuleType

import numpy as np

from refmoe.cpu import (
    BAND,
    Topology,
    cpu_family,
    cpu_flags,
    cpu_vendor,
    default_threads,
    partition_bands,
)
from refmoe.kernels import formats
from refmoe.kernels.formats import BLOCK, check_block, int4_packed_cols, scale_shape

# libgomp reads this once, when the first OpenMP module loads: at a barrier or between
# parallel regions a thread spins 10,000 times (a few microseconds), then sleeps on a futex.
# Its default (300,000 spins, ~0.1-1 ms) keeps cores busy that other work needs; spinning
# without bound collapses a 2-core machine shared with other processes. A user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

ALL_VARIANTS = (
    "avx512_bf16",
    "avx512",
    "avx2",
    "generic",
    "avx512_emulated",
    "avx512_bf16_emulated",
)
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}
_REQUIRED_FLAGS = {
    "avx512_bf16": _AVX512 | {"avx512_bf16", "avx512vbmi", "avx512_vnni"},
    "avx512": _AVX512,
    "avx2": {"avx2", "fma", "f16c"},
    "generic": set(),
    "avx512_emulated": set(),
    "avx512_bf16_emulated": set(),
}
_FMT = {"fp8": 0, "bf16": 1, "int4": 2, "mxfp4": 3, "nvfp4": 4, "int4g": 5}
LUT4_FORMATS = ("mxfp4", "nvfp4", "int4g")  # read as stored: lut4.h
_ACTIVATIONS = {"silu": 0, "swiglu_oai": 1, "silu_clamp": 2}  # kernels.h ACT_*


def _runs_here(name: str) -> bool:
    return _REQUIRED_FLAGS[name] <= cpu_flags()


@cache
def _module(name: str) -> ModuleType:
    if name not in ALL_VARIANTS:
        raise ValueError(f"unknown CPU variant {name!r}; known: {', '.join(ALL_VARIANTS)}")
    if not _runs_here(name):
        raise ValueError(
            f"CPU variant {name!r} needs {sorted(_REQUIRED_FLAGS[name])}, which this CPU lacks"
        )
    try:
        mod = importlib.import_module(f"refmoe.kernels._{name}")
    except ImportError as e:
        raise ValueError(f"CPU variant {name!r} was not built ({e})") from e
    if name not in _ROUTED:  # first use: the FP8 GEMV route, prefetch distance, AMX chosen
        mod.fp8_route(_FP8_ROUTE == "bf16")
        mod.prefetch_dist(_PREFETCH)
        mod.prefetch_hint(PREFETCH_HINTS.index(_PREFETCH_HINT))
        mod.prefetch_hint4(PREFETCH_HINTS.index(_PREFETCH_HINT_4BIT))
        mod.tiled_amx(int(_AMX))
        _ROUTED.add(name)
    return mod


# Which prefetch asks for the weights: "nta" (prefetchnta) on AMD's Zen 3 and Zen 5, where the
# distances below were measured; "t0" (prefetcht0) on Intel, where an NTA line that leaves L1
# before its load is read from DRAM again: on the 2-vCPU Xeon VM (AMX, 48 KiB L1; 2026-12-07)
# the FP8 GEMV ran at 0.24 of the read on two threads with NTA 16 KiB ahead, 0.52 at 2 KiB,
# 0.63-0.64 with T0; "t1" (prefetcht1: into L2, not L1) on Zen 4 (AMD family 25 with AVX-512),
# where the FP8 GEMV from DRAM on two threads read 25-26 GB/s with T1 4-64 KiB ahead against
# 15-18 with NTA 2 KiB, and the fused FP8 MoE layer 0.89 of the read against 0.59-0.67
# (kernels.md, "Prefetcht1 on Zen 4"). The 4-bit formats' loop (lut4.h) has its own: it
# converts at about half the rate per byte, and on that Zen 4 its fused MoE at gpt-oss's 2880 x
# 2880 read 16 GB/s with T1 against 20-21 with NTA (at 7168 x 2048 T1 did as well or better):
# it stays "nta" there. REFMOE_PREFETCH_HINT / REFMOE_PREFETCH_HINT_4BIT or set_prefetch_hint
# choose.
PREFETCH_HINTS = ("nta", "t0", "t1")  # the C side's PREFETCH_NTA, PREFETCH_T0, PREFETCH_T1


def default_prefetch_hint(
    vendor: str,
    family: int | None = None,
    flags: frozenset[str] | set[str] = frozenset(),
    *,
    four_bit: bool = False,
) -> str:
    """The prefetch for a CPU of this vendor_id, cpu family and flags: for the FP8, BF16 and
    INT4 weight streams, or with four_bit for the 4-bit formats' loop."""
    if vendor == "GenuineIntel":
        return "t0"
    if vendor == "AuthenticAMD" and family == 25 and "avx512f" in flags and not four_bit:
        return "t1"  # Zen 4 (Zen 3, the same family, has no AVX-512)
    return "nta"


def _hint_setting(var: str, default: str) -> str:
    hint = os.environ.get(var) or default
    if hint not in PREFETCH_HINTS:
        raise ValueError(f"{var}: expected one of {', '.join(PREFETCH_HINTS)}, got {hint!r}")
    return hint


_THIS_CPU = cpu_vendor(), cpu_family(), cpu_flags()
_PREFETCH_HINT = _hint_setting("REFMOE_PREFETCH_HINT", default_prefetch_hint(*_THIS_CPU))
_PREFETCH_HINT_4BIT = _hint_setting(
    "REFMOE_PREFETCH_HINT_4BIT", default_prefetch_hint(*_THIS_CPU, four_bit=True)
)


# How far ahead of its loads a GEMV prefetches the weights it streams (bytes): far enough to
# cover the memory's latency at the rate a core converts, near enough that the lines in flight
# and a row of activations (28 KiB at K = 7168) stay in L1. REFMOE_PREFETCH_BYTES or
# set_prefetch_distance choose; by default 16 KiB where the L1 data cache holds 48 KiB or more
# (Zen 5, Intel since Ice Lake: on the Zen 5 VM the fused FP8 MoE layer ran at 0.93-0.97 of the
# read against 0.71-0.74 at 2 KiB, kernels.md), else 2 KiB (on the Zen 3 VM's 32 KiB L1, 2 KiB
# beat none, and 4, 8 and 16 KiB decoded the demo no faster); 16 KiB with "t1", whose lines
# go to L2 (on the Zen 4 VM 4-64 KiB ran alike, 2 KiB as slowly as NTA).
PREFETCH_MAX = 1 << 20
PREFETCH_SHORT, PREFETCH_LONG, PREFETCH_LONG_L1 = 2048, 16384, 48 * 1024


def l1d_bytes(path: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The first core's L1 data cache in bytes, from sysfs (None where it does not say)."""
    try:
        for index in sorted(os.listdir(path)):
            base = os.path.join(path, index)
            with open(os.path.join(base, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(base, "type")) as f:
                kind = f.read().strip()
            if level == "1" and kind in ("Data", "Unified"):
                with open(os.path.join(base, "size")) as f:
                    size = f.read().strip().upper()
                scale = {"K": 1024, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        return None
    return None


def default_prefetch_distance(l1d: int | None, hint: str = "nta") -> int:
    """The prefetch distance for a CPU with this L1 data cache (bytes; None: unknown) asking
    with this hint."""
    if hint == "t1" or (l1d is not None and l1d >= PREFETCH_LONG_L1):
        return PREFETCH_LONG
    return PREFETCH_SHORT


def _prefetch_setting(text: str | None) -> int:
    if text is None:
        return default_prefetch_distance(l1d_bytes(), _PREFETCH_HINT)
    try:
        nbytes = int(text)
    except ValueError:
        nbytes = -1
    if not 0 <= nbytes <= PREFETCH_MAX:
        raise ValueError(f"REFMOE_PREFETCH_BYTES: expected 0 to {PREFETCH_MAX}, got {text!r}")
    return nbytes


_PREFETCH = _prefetch_setting(os.environ.get("REFMOE_PREFETCH_BYTES"))


def set_prefetch_distance(nbytes: int) -> int:
    """Prefetch the GEMVs' weights nbytes ahead (0 to 1 MiB) in every build, from now on;
    returns the distance it replaces. Call it before kernels run on other threads."""
    global _PREFETCH
    if not 0 <= nbytes <= PREFETCH_MAX:
        raise ValueError(f"prefetch distance must be 0 to {PREFETCH_MAX} bytes, got {nbytes}")
    before = prefetch_distance()
    _PREFETCH = nbytes
    for name in list(_ROUTED):
        importlib.import_module(f"refmoe.kernels._{name}").prefetch_dist(nbytes)
    return before


def set_prefetch_hint(hint: str, *, four_bit: bool = False) -> str:
    """Prefetch the GEMVs' weights with prefetchnta ("nta"), prefetcht0 ("t0") or prefetcht1
    ("t1") in every build, from now on: the FP8, BF16 and INT4 streams, or with four_bit the
    4-bit formats' loop; returns the setting it replaces. Call it before kernels run on other
    threads."""
    global _PREFETCH_HINT, _PREFETCH_HINT_4BIT
    if hint not in PREFETCH_HINTS:
        raise ValueError(f"prefetch hint must be one of {', '.join(PREFETCH_HINTS)}, got {hint!r}")
    if four_bit:
        before, _PREFETCH_HINT_4BIT = _PREFETCH_HINT_4BIT, hint
    else:
        before, _PREFETCH_HINT = _PREFETCH_HINT, hint
    for name in list(_ROUTED):
        mod = importlib.import_module(f"refmoe.kernels._{name}")
        (mod.prefetch_hint4 if four_bit else mod.prefetch_hint)(PREFETCH_HINTS.index(hint))
    return before


def prefetch_hint(*, four_bit: bool = False) -> str:
    """The GEMVs' prefetch (one of PREFETCH_HINTS), as the chosen variant has it: the FP8,
    BF16 and INT4 streams', or with four_bit the 4-bit formats' loop's."""
    mod = _module(_VARIANT)
    return PREFETCH_HINTS[(mod.prefetch_hint4 if four_bit else mod.prefetch_hint)(-1)]


def prefetch_distance() -> int:
    """The GEMVs' prefetch distance in bytes (the chosen variant's)."""
    mod = _module(_VARIANT)
    current = mod.prefetch_dist(-1)  # out of range: reads it back, changes nothing
    return int(current)


# The FP8 GEMV's route in the builds that have two (avx512_bf16 and its emulation): "fp32", the
# AVX-512 route the avx512 build runs, unless REFMOE_FP8_GEMV=bf16 asks for BF16 dot products
# with x in three bf16 parts. fp32 by default: on the one such CPU measured (a 2-vCPU Zen 4,
# 2026-12-06) it decoded the demo 20-30% faster (kernels.md). Both meet the same error bound.
FP8_GEMV_ROUTES = ("fp32", "bf16")
_FP8_ROUTE = os.environ.get("REFMOE_FP8_GEMV", "fp32")
if _FP8_ROUTE not in FP8_GEMV_ROUTES:
    raise ValueError(f"REFMOE_FP8_GEMV: expected fp32 or bf16, got {_FP8_ROUTE!r}")
_ROUTED: set[str] = set()


_BF16_DOT_VARIANTS = ("avx512_bf16", "avx512_bf16_emulated")  # the builds with both routes


def set_fp8_gemv_route(route: str) -> str:
    """Choose the FP8 GEMV's route ("fp32" or "bf16") for every build that has both, from now
    on; returns the setting it replaces. Call it before kernels run on other threads (tests and
    benchmarks switch it)."""
    global _FP8_ROUTE
    if route not in FP8_GEMV_ROUTES:
        raise ValueError(f"FP8 GEMV route must be fp32 or bf16, got {route!r}")
    before, _FP8_ROUTE = _FP8_ROUTE, route
    for name in list(_ROUTED):
        importlib.import_module(f"refmoe.kernels._{name}").fp8_route(route == "bf16")
    return before


def fp8_gemv_route(variant: str | None = None) -> str:
    """The route the FP8 GEMV takes in a variant (default: the chosen one): "bf16" only in a
    build with BF16 dot products and with that route chosen."""
    has_bf16 = (variant or _VARIANT) in _BF16_DOT_VARIANTS
    return "bf16" if has_bf16 and _FP8_ROUTE == "bf16" else "fp32"


# GEMMs of AMX_MIN_TOKENS tokens or more (prefill's projections and experts, an expert many
# tokens chose) run on AMX tiles in the avx512_bf16 build where the CPU has AMX-BF16 (Sapphire
# Rapids and later) and the kernel grants the process the tile state: each operand split into
# two bf16 parts, three tile products (bf16x3), every product within AMX_EXTRA_ERROR of its
# float32 value (relative; kernels.h rows_tiled_amx). On by default there; REFMOE_AMX=0 or
# set_amx_tiles(False) takes the float32 tiles instead. On the 2-vCPU Xeon VM (2026-12-07) an FP8
# GEMM of 128-512 tokens ran about 2x as fast (kernels.md).
AMX_MIN_TOKENS = 16  # kernels.h AMX_MIN_M
AMX_EXTRA_ERROR = 2.0**-14  # per product, times |x| |w|, beyond the float32 tiles' bound
_AMX_TEXT = os.environ.get("REFMOE_AMX", "1")
if _AMX_TEXT not in ("0", "1"):
    raise ValueError(f"REFMOE_AMX: expected 0 or 1, got {_AMX_TEXT!r}")
_AMX = _AMX_TEXT == "1"


def set_amx_tiles(on: bool) -> bool:
    """Let many-token GEMMs use AMX tiles where a build and the CPU have them (True), or not,
    from now on; returns the setting it replaces. Call it before kernels run on other threads."""
    global _AMX
    before, _AMX = _AMX, bool(on)
    for name in list(_ROUTED):
        importlib.import_module(f"refmoe.kernels._{name}").tiled_amx(int(_AMX))
    return before


def amx_tiles(variant: str | None = None) -> bool:
    """Whether a variant's GEMMs of AMX_MIN_TOKENS tokens or more run on AMX tiles here."""
    return _module(variant or _VARIANT).tiled_amx(-1) == 1


def available_variants() -> list[str]:
    """Variants that are built and can run on this CPU, fastest first."""
    out = []
    for name in ALL_VARIANTS:
        try:
            _module(name)
            out.append(name)
        except ValueError:
            pass
    return out


def _choose_variant() -> str:
    forced = os.environ.get("REFMOE_CPU_VARIANT")
    if forced:
        try:
            _module(forced)
        except ValueError as e:  # name the setting, and what this machine can run instead
            raise ValueError(
                f"REFMOE_CPU_VARIANT={forced}: {e}; this machine runs: "
                f"{', '.join(available_variants())}"
            ) from None
        return forced
    for name in ("avx512_bf16", "avx512", "avx2", "generic"):
        if name in available_variants():
            return name
    raise ImportError("no refmoe kernel variant is built; run `pip install -e .`")


_VARIANT = _choose_variant()


def variant() -> str:
    """The variant the entry points use by default (REFMOE_CPU_VARIANT forces one)."""
    return _VARIANT


# ---------------------------------------------------------------------------------------------
# Argument checks: every error names the argument and what was expected.
# ---------------------------------------------------------------------------------------------


def _as_codes(w, name: str) -> np.ndarray:
    """uint8 codes from a uint8 or float8_e4m3fn numpy array (or torch tensor)."""
    if hasattr(w, "numpy") and hasattr(w, "dtype") and "float8" in str(w.dtype):
        import torch

        w = w.view(torch.uint8).numpy()
    w = np.asarray(w)
    if w.dtype == np.uint8:
        return w
    if w.dtype.itemsize == 1 and "float8_e4m3fn" in str(w.dtype):
        return w.view(np.uint8)
    raise ValueError(f"{name}: expected uint8 or float8_e4m3fn, got {w.dtype}")


def _check(a, name: str, dtype, ndim: int, shape: tuple | None = None) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (use np.ascontiguousarray)")
    return a


def _check_x(x, k: int | None = None) -> np.ndarray:
    x = _check(x, "x", np.float32, 2)
    if k is not None and x.shape[1] != k:
        raise ValueError(f"x: expected {k} columns to match the weight's K, got {x.shape[1]}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x: empty shape {x.shape}")
    return x


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        n = _default_threads(os.environ.get("REFMOE_NUM_THREADS"))
    else:
        n = int(num_threads)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if n not in _PINNED and (len(_topology().nodes) > 1 or os.environ.get("REFMOE_PIN") == "1"):
        pin_threads(n)
    return n


_PINNED: set[int] = set()


@lru_cache(maxsize=8)
def _default_threads(env: str | None) -> int:
    """default_threads() as it was at the first call (per REFMOE_NUM_THREADS value): it reads
    the cgroup on every call (11 us, on every GEMV), and pin_threads narrows the calling
    thread's affinity mask to one node, which must not shrink the default pool after it."""
    return default_threads()


def pin_threads(num_threads: int, topology: Topology | None = None) -> None:
    """Pin the kernel pool's threads to their NUMA node's CPUs (thread t on the node that owns
    its bands in partition_bands). Done automatically on machines with several nodes (or with
    REFMOE_PIN=1); thread 0 is the calling thread, so its affinity changes too."""
    topo = topology or _topology()
    per_thread = topo.thread_cpus(num_threads)
    offsets = np.zeros(num_threads + 1, np.int32)
    offsets[1:] = np.cumsum([len(c) for c in per_thread])
    cpus = np.array([c for group in per_thread for c in group], np.int32)
    failed = _module(_VARIANT).pin(num_threads, offsets, cpus)
    if failed:
        raise OSError(f"could not pin {failed} of {num_threads} kernel threads to their CPUs")
    _PINNED.add(num_threads)


def thread_cpus(num_threads: int) -> list[int]:
    """The lowest CPU each pool thread may run on (to check pinning)."""
    out = np.zeros(num_threads, np.int32)
    _module(_VARIANT).affinity(num_threads, out)
    return out.tolist()


@lru_cache(maxsize=256)
def _bands(rows: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = partition_bands(rows, threads, _topology())
    return np.array(lo, np.int32), np.array(hi, np.int32)


ROW_STEP = 16  # rows: a thread's share of y starts on a 64-byte line


@lru_cache(maxsize=256)
def _row_split(rows: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Each thread's rows [lo[t], hi[t]) of the fused MoE's matrices. On one NUMA node an even
    split in runs of ROW_STEP rows, not of 128-row bands: gpt-oss's 2,880 rows are 22.5 bands,
    and 12 of 23 bands to one thread left it 7% past an even half (GLM-4.5-Air's 1,408: 6 of
    11, 9%). On several nodes the bands partition_bands placed, as rows."""
    if len(_topology().nodes) == 1:
        units = -(-rows // ROW_STEP)
        lo = [min(rows, units * i // threads * ROW_STEP) for i in range(threads)]
        hi = [min(rows, units * (i + 1) // threads * ROW_STEP) for i in range(threads)]
        return np.array(lo, np.int32), np.array(hi, np.int32)
    blo, bhi = _bands(rows, threads)
    return (
        np.minimum(blo * BAND, rows).astype(np.int32),
        np.minimum(bhi * BAND, rows).astype(np.int32),
    )


def _gemm_bands(rows: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The GEMV/GEMM's partition (its length: the threads to run). On one NUMA node a matrix of
    fewer 128-row bands than threads runs on as many threads as it has bands: the spare threads'
    ranges would be empty, and waking them cost more than the work (8 rows x 2048 FP8, two
    threads where one had nothing to do: 8.9 us against 4.8 on one, the 2-vCPU VM), and the
    single band went to the woken worker while the caller waited. Several nodes keep every
    thread: the pool's threads are pinned by node for the full count (pin_threads), and the
    bands must stay with the threads that placed them."""
    if len(_topology().nodes) == 1:
        threads = min(threads, -(-rows // BAND))
    return _bands(rows, threads)


@lru_cache(maxsize=1)
def _topology() -> Topology:
    return Topology.read()


def _pad(x: np.ndarray) -> np.ndarray:
    """x [M, K] -> [M, Kp] with zeros past K (the kernels read whole 128-wide blocks)."""
    m, k = x.shape
    kp = -(-k // BLOCK) * BLOCK
    if kp == k:
        return x
    out = np.zeros((m, kp), np.float32)
    out[:, :k] = x
    return out


def validate_fp8(codes, name: str) -> None:
    """Reject NaN codes (0x7F/0xFF) in an FP8 weight tensor, naming the tensor and index."""
    idx = formats.fp8_nan_index(_as_codes(codes, name))
    if idx is not None:
        raise ValueError(f"{name}: NaN FP8 code at index {idx}; checkpoints never hold NaN")


# ---------------------------------------------------------------------------------------------
# GEMV / GEMM: y [M, N] = x [M, K] @ W^T
# ---------------------------------------------------------------------------------------------


def _gemm(
    fmt: str,
    x,
    w: np.ndarray,
    s: np.ndarray,
    n: int,
    k: int,
    group: int,
    num_threads: int | None,
    variant: str | None,
    naive: bool,
    gscale: float = 1.0,
    block: tuple[int, int] = (BLOCK, BLOCK),
) -> np.ndarray:
    mod = _module(variant or _VARIANT)
    y = np.empty((x.shape[0], n), np.float32)
    wflat, sflat = w.reshape(-1).view(np.uint8), s.reshape(-1).view(np.uint8)
    if naive:
        mod.gemm_reference(_FMT[fmt], wflat, sflat, n, k, group, gscale, x, y, *block)
    else:
        t = _threads(num_threads)
        lo, hi = _gemm_bands(n, t)
        mod.gemm_rows(
            _FMT[fmt], wflat, sflat, n, k, group, gscale, _pad(x), y, len(lo), lo, hi, *block
        )
    return y


def fp8_gemm(
    x: np.ndarray,
    w,
    scale_inv: np.ndarray,
    *,
    block: tuple[int, int] = (BLOCK, BLOCK),
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
) -> np.ndarray:
    """y = x @ dequant(w).T with one scale per block of `block` = (bn, bk) rows and columns:
    DeepSeek-V3's 128 x 128 by default, any other weight_block_size, (1, WHOLE) per output
    channel, (WHOLE, WHOLE) per tensor (formats.WHOLE: the block spans the dimension).

    Args:
        x: float32 [M, K]; w: uint8 or float8_e4m3fn [N, K];
        scale_inv: float32 [ceil(N/bn), ceil(K/bk)].
    Returns: float32 [M, N].
    """
    w = _check(_as_codes(w, "w"), "w", np.uint8, 2)
    n, k = w.shape
    x = _check_x(x, k)
    block = check_block(block)
    s = _check(scale_inv, "scale_inv", np.float32, 2, scale_shape(n, k, block))
    return _gemm("fp8", x, w, s, n, k, 0, num_threads, variant, naive, block=block)


def fp8_gemm_many(
    x: np.ndarray,
    weights: list[tuple],
    *,
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
) -> list[np.ndarray]:
    """[x @ dequant(w).T for (w, scale_inv, block) in weights], every weight in one parallel
    region: the projections of one input (attention's q / kv / compressor projections, an
    MLP's gate and up) without a fork, a join and a barrier per weight. Each result equals
    fp8_gemm's for that weight, bit for bit. On several NUMA nodes the weights run one by one
    (each through the partition that placed its bands).

    Args:
        x: float32 [M, K]; weights: (w uint8 or float8_e4m3fn [N_i, K], scale_inv float32
            [ceil(N_i/bn), ceil(K/bk)], block (bn, bk)) per weight.
    Returns: float32 [M, N_i] per weight.
    """
    if not weights:
        raise ValueError("weights: expected at least one (w, scale_inv, block)")
    x = _check_x(x)
    k = x.shape[1]
    mats = []
    for i, entry in enumerate(weights):
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise ValueError(f"weights[{i}]: expected (w, scale_inv, block), got {type(entry)}")
        w, scale, block = entry
        w = _check(_as_codes(w, f"weights[{i}].w"), f"weights[{i}].w", np.uint8, 2)
        if w.shape[1] != k:
            raise ValueError(
                f"weights[{i}].w: expected {k} columns to match x, got shape {w.shape}"
            )
        block = check_block(block)
        sname = f"weights[{i}].scale_inv"
        scale = _check(scale, sname, np.float32, 2, scale_shape(w.shape[0], k, block))
        mats.append((w, scale, block))
    if naive or len(_topology().nodes) > 1:
        return [
            _gemm("fp8", x, w, sc, w.shape[0], k, 0, num_threads, variant, naive, block=b)
            for w, sc, b in mats
        ]
    ys = [np.empty((x.shape[0], w.shape[0]), np.float32) for w, _, _ in mats]
    specs = [
        (_FMT["fp8"], w.reshape(-1), sc.reshape(-1).view(np.uint8), w.shape[0], 0, 1.0, *b)
        for w, sc, b in mats
    ]
    _module(variant or _VARIANT).gemm_many(specs, k, _pad(x), ys, _threads(num_threads))
    return ys


def fp8_gemm_heads(
    x: np.ndarray,
    w,
    scale_inv: np.ndarray,
    *,
    block: tuple[int, int] = (BLOCK, BLOCK),
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
) -> np.ndarray:
    """y[b] = x[b] @ dequant(w[b]).T for B matrices at once, in one parallel region (MLA's
    absorbed decode: every head's slice of kv_b against that head's own vector).

    Args:
        x: float32 [B, M, K]; w: uint8 or float8_e4m3fn [B, N, K], each matrix's rows
            contiguous (the matrices themselves may be strided views into one weight);
        scale_inv: float32 [B, ceil(N/bn), ceil(K/bk)], likewise (block as fp8_gemm's).
    Returns: float32 [B, M, N].
    """
    block = check_block(block)
    w = _as_codes(w, "w")
    if w.dtype != np.uint8 or w.ndim != 3:
        raise ValueError(f"w: expected uint8 [B, N, K], got {w.dtype} with shape {w.shape}")
    b, n, k = w.shape
    if w.strides[2] != 1 or w.strides[1] != k:
        raise ValueError(f"w: each matrix's rows must be contiguous, strides {w.strides}")
    s = scale_inv
    want = (b, *scale_shape(n, k, block))
    if not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.shape != want:
        raise ValueError(
            f"scale_inv: expected float32 {want}, got "
            f"{getattr(s, 'dtype', type(s))} {getattr(s, 'shape', '')}"
        )
    if s.strides[2] != 4 or s.strides[1] != 4 * s.shape[2]:
        raise ValueError(f"scale_inv: each matrix's scales must be contiguous, strides {s.strides}")
    if (
        not isinstance(x, np.ndarray)
        or x.dtype != np.float32
        or x.shape[0] != b
        or x.ndim != 3
        or x.shape[2] != k
        or x.shape[1] < 1
    ):
        raise ValueError(
            f"x: expected float32 [{b}, M >= 1, {k}], got "
            f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}"
        )
    mod = _module(variant or _VARIANT)
    if naive:
        y = np.empty((b, x.shape[1], n), np.float32)
        for i in range(b):
            mod.gemm_reference(
                _FMT["fp8"],
                np.ascontiguousarray(w[i]).reshape(-1),
                np.ascontiguousarray(s[i]).reshape(-1).view(np.uint8),
                n,
                k,
                0,
                1.0,
                np.ascontiguousarray(x[i]),
                y[i],
                *block,
            )
        return y
    m = x.shape[1]
    xp = _pad(np.ascontiguousarray(x).reshape(b * m, k)).reshape(b, m, -1)  # [B, M, Kp]
    y = np.empty((b, m, n), np.float32)
    mod.gemm_heads(_FMT["fp8"], w, s, xp, y, _threads(num_threads), *block)
    return y


def bf16_gemm(
    x: np.ndarray,
    w: np.ndarray,
    *,
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
) -> np.ndarray:
    """y = x @ w.T for bf16 weights given as uint16 bits [N, K]."""
    w = _check(w, "w", np.uint16, 2)
    n, k = w.shape
    x = _check_x(x, k)
    return _gemm(
        "bf16", x, w.view(np.uint8), np.zeros(0, np.float32), n, k, 0, num_threads, variant, naive
    )


def int4_gemm(
    x: np.ndarray,
    w: np.ndarray,
    scales: np.ndarray,
    *,
    group_size: int = 128,
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
) -> np.ndarray:
    """y = x @ dequant(w).T for packed INT4 (see formats.int4_quantize).

    Args:
        x: float32 [M, K]; w: uint8 [N, ceil(K/32)*16]; scales: float32 [N, ceil(K/group)].
    """
    if group_size not in (32, 128):
        raise ValueError(f"group_size must be 32 or 128, got {group_size}")
    x = _check_x(x)
    k = x.shape[1]
    w = _check(w, "w", np.uint8, 2)
    n = w.shape[0]
    if w.shape[1] != int4_packed_cols(k):
        raise ValueError(
            f"w: packed INT4 for K={k} has {int4_packed_cols(k)} columns, got {w.shape[1]}"
        )
    s = _check(scales, "scales", np.float32, 2, (n, -(-k // group_size)))
    return _gemm("int4", x, w, s, n, k, group_size, num_threads, variant, naive)


# ---------------------------------------------------------------------------------------------
# The 4-bit formats as stored (lut4.h): MXFP4, NVFP4, compressed-tensors INT4
# ---------------------------------------------------------------------------------------------

_SCALE_DTYPES = {
    "mxfp4": ("uint8",),  # E8M0 bytes
    "nvfp4": ("uint8", "float8_e4m3fn"),
    "int4g": ("uint16", "bfloat16"),  # bf16 bits
}


def lut4_shapes(fmt: str, k: int, group: int = 32) -> tuple[int, int]:
    """(stored bytes per row, scales per row) of a 4-bit format for rows of K codes."""
    if fmt == "mxfp4":
        return -(-k // formats.MX_BLOCK) * 16, -(-k // formats.MX_BLOCK)
    if fmt == "nvfp4":
        return -(-k // formats.NV_BLOCK) * 8, -(-k // formats.NV_BLOCK)
    if fmt == "int4g":
        return -(-k // 8) * 4, -(-k // group)
    raise ValueError(f"not a 4-bit format: {fmt!r}; known: {', '.join(LUT4_FORMATS)}")


def _raw(a, name: str, allowed: tuple[str, ...]) -> np.ndarray:
    """A numpy array (or torch tensor) of one of the allowed dtypes, as contiguous raw bytes of
    the same shape and item size (uint8 or uint16 or int32)."""
    if hasattr(a, "numpy") and hasattr(a, "dtype") and not isinstance(a, np.ndarray):
        import torch

        if a.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            a = a.view(torch.uint16 if a.dtype == torch.bfloat16 else torch.uint8)
        a = a.contiguous().numpy()
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(a).__name__}")
    dtype = _dtype_name(a.dtype)
    if dtype not in allowed:
        raise ValueError(f"{name}: expected dtype {' or '.join(allowed)}, got {a.dtype}")
    kind = _RAW_KIND.get(dtype)
    a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    return a if kind is None else a.view(kind)


_RAW_KIND = {"bfloat16": np.dtype(np.uint16), "float8_e4m3fn": np.dtype(np.uint8)}


@lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    """str(dtype), cached: numpy formats it afresh each time (microseconds, on every call of a
    4-bit GEMV)."""
    return str(dtype)


def validate_lut4(
    fmt: str,
    w,
    scales,
    k: int,
    name: str,
    *,
    group: int = 32,
    global_scale=None,
    values: bool = True,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Check a 4-bit weight as stored and return (rows as bytes [N, row_bytes], scales as raw
    contiguous codes, global scale). Errors name the tensor, the field and the index.

    mxfp4: w uint8 [N, ceil(K/32), 16] (gpt-oss `*_blocks`) or [N, ceil(K/32)*16]; scales
        uint8 E8M0 [N, ceil(K/32)], 0xFF (NaN) refused.
    nvfp4: w uint8 [N, ceil(K/16)*8]; scales E4M3 (uint8 or float8_e4m3fn) [N, ceil(K/16)],
        NaN codes refused; global_scale a finite positive float32 (weight_scale_2).
    int4g: w int32 [N, ceil(K/8)] (compressed-tensors weight_packed); scales bf16 (bits or
        bfloat16) [N, ceil(K/group)], group a multiple of 32, non-finite scales refused.
    """
    if fmt == "int4g" and (group < 32 or group % 32):
        raise ValueError(f"{name}: INT4 group size must be a multiple of 32, got {group}")
    row_bytes, nscales = lut4_shapes(fmt, k, group)
    wdt = ("int32", "uint8") if fmt == "int4g" else ("uint8",)  # int4g: words, or their bytes
    w = _raw(w, name, wdt)
    n = w.shape[0] if w.ndim else 0
    want = (n, row_bytes // w.itemsize)
    if fmt == "mxfp4" and w.ndim == 3:
        want3 = (n, nscales, 16)
        if w.shape != want3:
            raise ValueError(
                f"{name}: MXFP4 blocks for K={k}: expected shape {want3}, got {w.shape}"
            )
        w = w.reshape(want)
    if w.ndim != 2 or w.shape != want or n < 1:
        raise ValueError(
            f"{name}: {fmt} weight for K={k}: expected shape [N, {want[1]}], got {w.shape}"
        )
    sname = (
        f"{name}_scale"
        if not name.endswith(("blocks", "weight_packed"))
        else name.rsplit("_", 1)[0] + "_scales"
    )
    s = _raw(scales, sname, _SCALE_DTYPES[fmt])
    if s.shape != (n, nscales):
        raise ValueError(f"{sname}: expected shape {(n, nscales)}, got {s.shape}")
    if values:  # a scan of every scale: skipped for weights validated once at load
        _check_lut4_scales(fmt, w, s, k, sname)
    g = 1.0
    if fmt == "nvfp4":
        if global_scale is None:
            raise ValueError(f"{name}: NVFP4 needs its global scale (weight_scale_2)")
        gs = np.asarray(global_scale, dtype=np.float64).reshape(-1)
        if gs.size != 1 or not np.isfinite(gs[0]) or gs[0] <= 0:
            raise ValueError(f"{name}_scale_2: expected one finite positive float, got {gs}")
        g = float(np.float32(gs[0]))
    return w.view(np.uint8).reshape(n, row_bytes), s, g


def _check_lut4_scales(fmt: str, w: np.ndarray, s: np.ndarray, k: int, sname: str) -> None:
    """Refuse NaN (MXFP4, NVFP4) or non-finite (INT4 bf16) scale codes, naming the index, and
    MXFP4 blocks whose values pass float32's range."""
    if fmt == "mxfp4":
        bad = s == formats.E8M0_NAN
        if not bad.any() and (s >= 253).any():  # 6 * 2^126 is past float32: such blocks
            rows = (s >= 253).any(axis=1)
            big = formats.mxfp4_dequantize(w[rows], s[rows], k)
            if (np.abs(big) > np.finfo(np.float32).max).any():
                raise ValueError(
                    f"{sname}: a block's values exceed float32's range (scale code >= 253)"
                )
    elif fmt == "nvfp4":
        bad = (s & 0x7F) == 0x7F
    else:
        bad = (s & 0x7F80) == 0x7F80  # bf16 exponent all ones: inf or NaN
    if bad.any():
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
        raise ValueError(
            f"{sname}: {'NaN' if fmt != 'int4g' else 'non-finite'} scale at index {idx}"
        )


def _lut4_gemm(fmt, x, w, scales, group, global_scale, num_threads, variant, naive, validate):
    x = _check_x(x)
    k = x.shape[1]
    wb, s, g = validate_lut4(
        fmt, w, scales, k, "w", group=group, global_scale=global_scale, values=validate
    )
    return _gemm(fmt, x, wb, s, wb.shape[0], k, group, num_threads, variant, naive, g)


def mxfp4_gemm(
    x: np.ndarray,
    blocks,
    scales,
    *,
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
    validate: bool = True,
) -> np.ndarray:
    """y = x @ dequant(W).T for MXFP4 as gpt-oss stores it (see validate_lut4).
    x: float32 [M, K]. Returns float32 [M, N]. Activations run as int8 per chunk of 32.
    validate=False skips the scan of the scale values (shapes and dtypes are always checked):
    for weights validated once at load."""
    return _lut4_gemm("mxfp4", x, blocks, scales, 32, None, num_threads, variant, naive, validate)


def nvfp4_gemm(
    x: np.ndarray,
    weight,
    weight_scale,
    weight_scale_2,
    *,
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
    validate: bool = True,
) -> np.ndarray:
    """y = x @ dequant(W).T for NVFP4 as ModelOpt writes it (see validate_lut4)."""
    return _lut4_gemm(
        "nvfp4", x, weight, weight_scale, 16, weight_scale_2, num_threads, variant, naive, validate
    )


def int4g_gemm(
    x: np.ndarray,
    weight_packed,
    weight_scale,
    *,
    group_size: int = 32,
    num_threads: int | None = None,
    variant: str | None = None,
    naive: bool = False,
    validate: bool = True,
) -> np.ndarray:
    """y = x @ dequant(W).T for compressed-tensors pack-quantized INT4 (see validate_lut4)."""
    return _lut4_gemm(
        "int4g",
        x,
        weight_packed,
        weight_scale,
        group_size,
        None,
        num_threads,
        variant,
        naive,
        validate,
    )


# ---------------------------------------------------------------------------------------------
# Fused routed-expert MLP
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ExpertWeights:
    """Routed experts of one MoE layer in one format, one host copy.

    gate/up: per expert [I, H] codes; down: [H, I]. Scales per expert as the format needs:
    FP8 scale_inv [ceil(rows/bn), ceil(cols/bk)] (fp8_block, as fp8_gemm's block), INT4
    [rows, ceil(cols/group)], BF16 none,
    the 4-bit formats as stored (validate_lut4; NVFP4's weight_scale_2 in *_global).
    """

    fmt: str
    hidden: int
    intermediate: int
    gate: list[np.ndarray]
    up: list[np.ndarray]
    down: list[np.ndarray]
    gate_scale: list[np.ndarray] = field(default_factory=list)
    up_scale: list[np.ndarray] = field(default_factory=list)
    down_scale: list[np.ndarray] = field(default_factory=list)
    group_size: int = 128
    fp8_block: tuple[int, int] = (BLOCK, BLOCK)
    validate: bool = True  # scan FP8 weights for NaN codes (once, at load)
    # the activation: "silu" (silu(gate) * up), "swiglu_oai" (gpt-oss: gate clamped above at
    # limit, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate)) or "silu_clamp"
    # (DeepSeek-V4: the same clamps, silu(gate) * up)
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    # biases per expert (gpt-oss): float32 [I], [I], [H], or empty for none
    gate_bias: list[np.ndarray] = field(default_factory=list)
    up_bias: list[np.ndarray] = field(default_factory=list)
    down_bias: list[np.ndarray] = field(default_factory=list)
    gate_global: list[float] = field(default_factory=list)  # NVFP4 weight_scale_2 per expert
    up_global: list[float] = field(default_factory=list)
    down_global: list[float] = field(default_factory=list)
    _flat: list = field(default_factory=list, repr=False)  # 1-D views the kernels take
    _gscale: np.ndarray = field(default_factory=lambda: np.ones((3, 0)), repr=False)

    def __post_init__(self) -> None:
        if self.fmt not in _FMT:
            raise ValueError(f"expert format must be one of {sorted(_FMT)}, got {self.fmt!r}")
        h, i, e = self.hidden, self.intermediate, len(self.gate)
        if e == 0 or len(self.up) != e or len(self.down) != e:
            raise ValueError(
                f"need the same nonzero number of gate/up/down matrices, got "
                f"{len(self.gate)}/{len(self.up)}/{len(self.down)}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.activation == "swiglu_oai" and not (self.limit > 0 and np.isfinite(self.alpha)):
            raise ValueError(f"swiglu_oai needs limit > 0 and a finite alpha, got {self.limit}")
        if self.activation == "silu_clamp" and not self.limit > 0:
            raise ValueError(f"silu_clamp needs limit > 0, got {self.limit}")
        for kind, biases, size in (
            ("gate", self.gate_bias, i),
            ("up", self.up_bias, i),
            ("down", self.down_bias, h),
        ):
            if biases and len(biases) != e:
                raise ValueError(f"{kind}_bias: expected {e} bias vectors, got {len(biases)}")
            for j, b in enumerate(biases):
                biases[j] = _check(
                    np.ascontiguousarray(b), f"experts.{j}.{kind}_proj.bias", np.float32, 1, (size,)
                )
                if not np.isfinite(biases[j]).all():
                    raise ValueError(f"experts.{j}.{kind}_proj.bias: not finite")
        self.fp8_block = check_block(self.fp8_block, "fp8_block")
        self._gscale = np.ones((3, e))
        for kind, mats, scales, (rows, cols), glob in (
            ("gate", self.gate, self.gate_scale, (i, h), self.gate_global),
            ("up", self.up, self.up_scale, (i, h), self.up_global),
            ("down", self.down, self.down_scale, (h, i), self.down_global),
        ):
            if self.fmt != "bf16" and len(scales) != e:
                raise ValueError(f"{kind}_scale: expected {e} scale tensors, got {len(scales)}")
            if self.fmt == "nvfp4" and len(glob) != e:
                raise ValueError(f"{kind}_global: expected {e} global scales, got {len(glob)}")
            for j, m in enumerate(mats):
                name = f"experts.{j}.{kind}_proj.weight"
                if self.fmt in LUT4_FORMATS:
                    mats[j], scales[j], g = validate_lut4(
                        self.fmt,
                        m,
                        scales[j],
                        cols,
                        name,
                        group=self.group_size if self.fmt == "int4g" else 32,
                        global_scale=glob[j] if self.fmt == "nvfp4" else None,
                        values=self.validate,
                    )
                    if mats[j].shape[0] != rows:
                        raise ValueError(f"{name}: expected {rows} rows, got {mats[j].shape[0]}")
                    self._gscale[("gate", "up", "down").index(kind), j] = g
                elif self.fmt == "fp8":
                    mats[j] = _check(_as_codes(m, name), name, np.uint8, 2, (rows, cols))
                    if self.validate:
                        validate_fp8(mats[j], name)
                    _check(
                        scales[j],
                        f"experts.{j}.{kind}_proj.weight_scale_inv",
                        np.float32,
                        2,
                        scale_shape(rows, cols, self.fp8_block),
                    )
                elif self.fmt == "bf16":
                    _check(m, name, np.uint16, 2, (rows, cols))
                else:
                    _check(m, name, np.uint8, 2, (rows, int4_packed_cols(cols)))
                    _check(
                        scales[j],
                        f"experts.{j}.{kind}_proj.scales",
                        np.float32,
                        2,
                        (rows, -(-cols // self.group_size)),
                    )

        empty = np.zeros(0, np.uint8)
        self._flat = [
            [m.reshape(-1).view(np.uint8) for m in mats]
            if kind == "w"
            else ([s.reshape(-1).view(np.uint8) for s in mats] if mats else [empty] * e)
            for kind, mats in (
                ("w", self.gate),
                ("s", self.gate_scale),
                ("w", self.up),
                ("s", self.up_scale),
                ("w", self.down),
                ("s", self.down_scale),
            )
        ]

    @property
    def num_experts(self) -> int:
        return len(self.gate)

    def global_scales(self) -> np.ndarray:
        """[3, E] the per-matrix global scales of gate, up, down (NVFP4's weight_scale_2;
        1 in every other format)."""
        return self._gscale

    def nbytes(self, expert: int) -> int:
        """Bytes of weights and scales one expert reads."""
        parts = [self.gate, self.up, self.down, self.gate_scale, self.up_scale, self.down_scale]
        return sum(p[expert].nbytes for p in parts if p)


def fused_moe(
    x: np.ndarray,
    token_ids: np.ndarray,
    expert_ids: np.ndarray,
    routing_weights: np.ndarray,
    experts: ExpertWeights,
    *,
    num_threads: int | None = None,
    variant: str | None = None,
) -> np.ndarray:
    """y [T, H] = sum over assignments a of routing_weights[a] * expert_{expert_ids[a]}(x[t_a]).

    The expert MLP is down(act(gate x + gate_bias, up x + up_bias)) + down_bias, act the
    experts' activation (silu(g) * u, or gpt-oss's clamped SwiGLU), biases where given.
    Assignments are grouped by expert so every expert's weights are read once per call,
    whatever number of tokens it serves.
    Args: x float32 [T, H]; token_ids, expert_ids int [A]; routing_weights float32 [A].
    """
    x = _check_x(x, experts.hidden)
    t_count = x.shape[0]
    tok = np.asarray(token_ids)
    exp = np.asarray(expert_ids)
    rw = np.asarray(routing_weights)
    if tok.ndim != 1 or exp.shape != tok.shape or rw.shape != tok.shape:
        raise ValueError(
            f"token_ids, expert_ids, routing_weights must be 1-D of one length, "
            f"got {tok.shape}, {exp.shape}, {rw.shape}"
        )
    if not (np.issubdtype(tok.dtype, np.integer) and np.issubdtype(exp.dtype, np.integer)):
        raise ValueError("token_ids and expert_ids must be integer arrays")
    if rw.dtype != np.float32:
        raise ValueError(f"routing_weights: expected float32, got {rw.dtype}")
    if tok.size and (tok.min() < 0 or tok.max() >= t_count):
        raise ValueError(
            f"token_ids: values must lie in [0, {t_count}), got [{tok.min()}, {tok.max()}]"
        )
    if exp.size and (exp.min() < 0 or exp.max() >= experts.num_experts):
        raise ValueError(
            f"expert_ids: values must lie in [0, {experts.num_experts}), got "
            f"[{exp.min()}, {exp.max()}]"
        )
    y = np.zeros((t_count, experts.hidden), np.float32)
    if tok.size == 0:
        return y
    order = np.argsort(exp, kind="stable")
    used, counts = np.unique(exp[order], return_counts=True)
    offsets = np.zeros(len(used) + 1, np.int32)
    offsets[1:] = np.cumsum(counts)
    t = _threads(num_threads)
    gu_lo, gu_hi = _row_split(experts.intermediate, t)
    dn_lo, dn_hi = _row_split(experts.hidden, t)
    flat = [[part[e] for e in used] for part in experts._flat]
    _module(variant or _VARIANT).moe(
        _FMT[experts.fmt],
        experts.group_size,
        experts.intermediate,
        x,
        offsets,
        np.ascontiguousarray(tok[order], np.int32),
        np.ascontiguousarray(rw[order]),
        *flat,
        np.ascontiguousarray(experts._gscale[:, used]),
        y,
        t,
        gu_lo,
        gu_hi,
        dn_lo,
        dn_hi,
        _ACTIVATIONS[experts.activation],
        experts.alpha,
        experts.limit,
        *(
            np.stack([b[e] for e in used]) if b else None
            for b in (experts.gate_bias, experts.up_bias, experts.down_bias)
        ),
        experts.fp8_block,
    )
    return y


# ---------------------------------------------------------------------------------------------
# Placement, CPU state, and the bandwidth limit measured beside the kernels
# ---------------------------------------------------------------------------------------------


def place(w: np.ndarray, *, num_threads: int | None = None) -> np.ndarray:
    """A copy of w [rows, ...] whose 128-row bands were first written by the threads that
    compute them (NUMA first touch). Use it once at load; the kernels then read local memory."""
    w = np.ascontiguousarray(w)
    t = _threads(num_threads)
    lo, hi = _bands(w.shape[0], t)
    dst = np.empty_like(w)  # large allocations are untouched mmap pages until written
    rows = w.reshape(w.shape[0], -1).view(np.uint8)
    _module(_VARIANT).place(rows, dst.reshape(w.shape[0], -1).view(np.uint8), t, lo, hi)
    return dst


def fp8_to_float32(
    codes: np.ndarray, *, variant: str | None = None, gemv_path: bool = False
) -> np.ndarray:
    """E4M3 codes -> float32 (flattened) through the variant's vector conversion: the GEMM
    tiles' (default) or the GEMV's own (gemv_path); NaN codes are rejected."""
    codes = np.ascontiguousarray(_as_codes(codes, "codes")).reshape(-1)
    validate_fp8(codes, "codes")
    out = np.empty(codes.shape, np.float32)
    if codes.size:
        _module(variant or _VARIANT).fp8_to_float32(codes, out, gemv_path)
    return out


def fp8_dequant(
    codes,
    scale,
    block: tuple[int, int] = (128, 128),
    *,
    bf16: bool = False,
    num_threads: int | None = None,
    validate: bool = True,
    variant: str | None = None,
) -> np.ndarray:
    """FP8 E4M3 codes [N, K] (uint8 or float8_e4m3fn) times their block scales (float32
    [ceil(N/bn), ceil(K/bk)], one per block of `block` = (bn, bk)) -> [N, K] float32, or with
    bf16 the same rounded to bfloat16 (nearest even) as uint16 bits: what SLP's compute lane
    needs where its device is the CPU, on every thread (torch's own conversion runs at about
    0.2 GB/s of codes on a 2-vCPU Zen 4). validate=False skips the NaN-code scan for codes
    validated at load."""
    codes = np.ascontiguousarray(_as_codes(codes, "codes"))
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, K], got shape {codes.shape}")
    n, k = codes.shape
    bn, bk = (int(b) for b in block)
    if bn < 1 or bk < 1:
        raise ValueError(f"block must be two positive sizes, got {block}")
    scale = _check(scale, "scale", np.float32, 2, (-(-n // bn), -(-k // bk)))
    if validate:
        validate_fp8(codes, "codes")
    out = np.empty((n, k), np.uint16 if bf16 else np.float32)
    if out.size:
        _module(variant or _VARIANT).fp8_dequant(
            codes, scale, bn, bk, out.view(np.uint8), bf16, _threads(num_threads)
        )
    return out


_NO_WEIGHT = np.zeros(1, np.float32)


def rms_norm(
    x: np.ndarray, weight: np.ndarray | None, eps: float, *, variant: str | None = None
) -> np.ndarray:
    """RMSNorm over the last axis of float32 x (any leading shape): x * rsqrt(mean(x^2) + eps),
    times weight [n] where given. One C pass per row instead of five torch operations (20-25 us
    each on the 2-vCPU VM at decode's one row); each row's result is the same whatever rows
    come with it."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim < 1:
        raise ValueError("rms_norm: x must have at least one dimension")
    n = x.shape[-1]
    if weight is not None:
        weight = np.ascontiguousarray(weight, np.float32)
        if weight.shape != (n,):
            raise ValueError(f"rms_norm: weight must have shape ({n},), got {weight.shape}")
    rows = x.reshape(-1, n) if n else x.reshape(0, 0)
    out = np.empty_like(x)
    _module(variant or _VARIANT).rms_norm(
        rows,
        _NO_WEIGHT if weight is None else weight,
        out.reshape(rows.shape),
        eps,
        weight is not None,
    )
    return out


def sinkhorn(a: np.ndarray, iters: int, eps: float, *, variant: str | None = None) -> np.ndarray:
    """Sinkhorn-Knopp on a float32 [T, c, c] (DeepSeek-V4's hyper-connections): columns
    normalized, then rows and columns in turn, iters passes of each kind (the first pass columns
    only), every sum + eps before it divides. Returns a new array; the same float32 operations
    in the same order as numpy's a / (a.sum(axis, keepdims=True) + eps), without numpy's cost
    per call (about 80 of them for 20 passes)."""
    a = np.array(a, dtype=np.float32, order="C", copy=True)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"sinkhorn: expected float32 [T, c, c], got shape {a.shape}")
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    _module(variant or _VARIANT).sinkhorn(a, int(iters), float(eps))
    return a


def hyper_collapse(
    x: np.ndarray,
    fn: np.ndarray,
    base: np.ndarray,
    scale: np.ndarray,
    norm_eps: float,
    hc_eps: float,
    iters: int,
    *,
    num_threads: int | None = None,
    variant: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek-V4's hyper-connection ahead of a block, in one call: x float32 [T, c, H] (the
    streams), fn [(2 + c) c, c H], base [(2 + c) c], scale [3]. Returns post [T, c], comb
    [T, c, c] (row softmax, then Sinkhorn-Knopp as `sinkhorn`) and the collapsed streams
    [T, H] (pre-weighted sum), as transformers' DeepseekV4HyperConnection computes them (within
    float32 rounding: the rms scale is applied to the dot products, not to x first)."""
    x = _check(x, "x", np.float32, 3)
    t, c, h = x.shape
    m = (2 + c) * c
    fn = _check(fn, "fn", np.float32, 2, (m, c * h))
    base = _check(base, "base", np.float32, 1, (m,))
    scale = _check(scale, "scale", np.float32, 1, (3,))
    if c > 64 or iters < 1:
        raise ValueError(
            f"hyper_collapse: need 1 <= c <= 64 streams and iters >= 1, got {c}, {iters}"
        )
    mix = np.empty((t, m), np.float32)
    post, comb = np.empty((t, c), np.float32), np.empty((t, c, c), np.float32)
    col = np.empty((t, h), np.float32)
    if t:
        threads = min(_threads(num_threads), m)
        _module(variant or _VARIANT).hyper_collapse(
            x, fn, base, scale, norm_eps, hc_eps, int(iters), mix, post, comb, col, threads
        )
    return post, comb, col


def indexer_scores(
    q: np.ndarray,
    w: np.ndarray,
    keys: np.ndarray,
    limits: np.ndarray | None = None,
    *,
    num_threads: int | None = None,
    variant: str | None = None,
) -> np.ndarray:
    """DeepSeek-V4's lightning indexer: scores [T, E] = sum over heads h of w[t, h] relu(q[t,
    h] . keys[e]), for q float32 [T, n, d], w [T, n] and keys [E, d]; with limits (int32 [T])
    only e < limits[t] is scored and the rest is -inf (the entries a query may not see yet are
    never computed). One pass over the keys per query, without the n x T x E intermediate the
    torch form (relu(q @ keys.T) weighted and summed over heads) writes and reads back."""
    q = _check(q, "q", np.float32, 3)
    t, n, d = q.shape
    w = _check(w, "w", np.float32, 2, (t, n))
    keys = _check(keys, "keys", np.float32, 2)
    if keys.shape[1] != d:
        raise ValueError(f"indexer_scores: keys are {keys.shape[1]} wide, the queries {d}")
    lim = np.zeros(1, np.int32) if limits is None else _check(limits, "limits", np.int32, 1, (t,))
    out = np.empty((t, keys.shape[0]), np.float32)
    if t and keys.shape[0]:
        threads = max(1, min(_threads(num_threads), max(t, keys.shape[0] // 64)))
        mod = _module(variant or _VARIANT)
        mod.indexer_scores(q, w, keys, lim, limits is not None, out, threads)
    return out


def set_denormals_zero(
    on: bool, *, num_threads: int | None = None, variant: str | None = None
) -> None:
    """Set MXCSR DAZ+FTZ on this thread and the kernel pool's threads (x86 only)."""
    _module(variant or _VARIANT).denormals_zero(bool(on), _threads(num_threads))


def read_bandwidth_probe(buf: np.ndarray, *, num_threads: int | None = None) -> int:
    """Stream-read every byte of buf with the kernels' threads (time it to get read GB/s)."""
    b = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    return _module(_VARIANT).read(b, _threads(num_threads))


def fma_peak_gflops(
    *, num_threads: int | None = None, variant: str | None = None, seconds: float = 0.2
) -> float:
    """FMA throughput of the kernel threads in GFLOP/s (best of 3 runs of ~seconds/3)."""
    import time

    mod, t = _module(variant or _VARIANT), _threads(num_threads)
    iters, best = 100_000, 0.0
    for _ in range(8):  # grow until one run takes long enough to time
        t0 = time.perf_counter()
        flops = mod.fma_peak_flops(iters, t)
        dt = time.perf_counter() - t0
        if dt > seconds / 3:
            best = max(best, flops / dt / 1e9)
            for _ in range(2):
                t0 = time.perf_counter()
                flops = mod.fma_peak_flops(iters, t)
                best = max(best, flops / (time.perf_counter() - t0) / 1e9)
            return best
        iters *= 4
    return flops / dt / 1e9


__all__ = [
    "indexer_scores",
    "rms_norm",
    "hyper_collapse",
    "sinkhorn",
    "ALL_VARIANTS",
    "AMX_EXTRA_ERROR",
    "AMX_MIN_TOKENS",
    "ExpertWeights",
    "amx_tiles",
    "available_variants",
    "bf16_gemm",
    "fma_peak_gflops",
    "fp8_gemm",
    "fp8_to_float32",
    "fused_moe",
    "int4_gemm",
    "int4g_gemm",
    "lut4_shapes",
    "mxfp4_gemm",
    "nvfp4_gemm",
    "validate_lut4",
    "pin_threads",
    "place",
    "read_bandwidth_probe",
    "set_amx_tiles",
    "set_prefetch_hint",
    "set_denormals_zero",
    "thread_cpus",
    "validate_fp8",
    "variant",
]
