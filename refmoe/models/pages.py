"""Shared pages: the prefix cache's blocks in one shared-memory file, mapped copy-free into the
caches of the requests that restore them.

A request's cache is contiguous (kv_cache.Growing: attention reads one tensor), so a prefix
cannot be shared by pointing at blocks, as a paged cache would. It can be shared through the
page tables: the blocks live in a memfd, and a cache that restores them maps the file's pages
over the start of its own buffer (mmap MAP_FIXED, read-only), so that every request with the
prefix reads the same physical memory and writes only what follows it. Nothing is copied and
the prefix is held once, however many requests read it.

    layout      a part of a layer's cache (MLA's latent, GQA's keys or values) is `outer`
                stripes of rows (GQA's [g, S, d]: a stripe per key head; MLA's [S, D]: one),
                and a block is `rows` consecutive rows of every stripe. The file is laid out
                stripe-major: each stripe has a region of `slots` blocks, so the blocks of
                consecutive slots are consecutive in the file, and a run of them maps with one
                mmap per stripe (the kernel keeps one mapping per run, not per block, well
                under vm.max_map_count).
    pooled      a part is held in the file when a block of one of its stripes is a whole number
                of pages and of rows (rate divides the block's tokens); any other part (a
                DeepSeek-V4 compressed part whose block holds a fraction of a row) is kept as
                tensors of the block's own and copied on restore.
    pins        a slot a live request maps, or a match holds until it is restored, is pinned:
                the prefix cache does not evict it, so its pages are never rewritten under a
                reader. Pins are dropped by finalizers (the mapping's, the match's), which only
                queue the slots; the cache drains the queue under its lock.

Linux only (memfd_create, MAP_FIXED); elsewhere the pool lives in anonymous memory and restores
copy, as before.
"""

from __future__ import annotations

import ctypes
import heapq
import math
import mmap
import os
import threading
import weakref
from collections import Counter, deque
from dataclasses import dataclass

import torch

PAGE = mmap.PAGESIZE
_PROT_READ, _MAP_SHARED, _MAP_FIXED = 0x1, 0x01, 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc_mmap():
    """libc's mmap (Python's mmap module maps only at an address of its choosing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    return fn


_mmap_at = _libc_mmap() if hasattr(os, "memfd_create") else None


def _address(m: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@dataclass(frozen=True, slots=True)
class Part:
    """One growing part of one layer's cache, as the pool holds it."""

    layer: int
    index: int  # its place among the layer's parts
    dim: int  # the growing dimension
    rate: int  # positions per row
    dtype: torch.dtype
    outer: tuple[int, ...]  # the dimensions before the growing one (its stripes)
    inner: tuple[int, ...]  # the dimensions after it (a row)
    rows: int  # rows per block
    pooled: bool  # held in the file (else: the block's own tensors)
    stripe0: int = 0  # its first stripe's index in the file

    @property
    def stripes(self) -> int:
        return math.prod(self.outer)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.inner) * self.dtype.itemsize

    @property
    def stripe_bytes(self) -> int:
        """A block of one stripe."""
        return self.rows * self.row_bytes


def layout(parts: list[list], block_tokens: int) -> list[list[Part]]:
    """The pool's parts for a cache's parts (KVCache.parts(): Growing per layer), pooled where a
    block of a stripe is whole rows and whole pages."""
    out: list[list[Part]] = []
    stripe = 0
    for li, layer in enumerate(parts):
        row: list[Part] = []
        for j, g in enumerate(layer):
            shape = tuple(g.buf.shape) if g.buf is not None else (0,) * (g.dim + 1)
            outer, inner = shape[: g.dim], shape[g.dim + 1 :]
            rows, whole = divmod(block_tokens, g.rate)
            dtype = g.buf.dtype if g.buf is not None else torch.float32
            part = Part(li, j, g.dim, g.rate, dtype, outer, inner, rows, False)
            pooled = g.buf is not None and not whole and rows > 0
            pooled = pooled and part.stripe_bytes > 0 and part.stripe_bytes % PAGE == 0
            part = Part(li, j, g.dim, g.rate, dtype, outer, inner, rows, pooled, stripe)
            stripe += part.stripes if pooled else 0
            row.append(part)
        out.append(row)
    return out


class Pool:
    """Fixed-size block slots in one file, stripe-major (see the module's docstring)."""

    def __init__(self, parts: list[list[Part]], slots: int):
        self.parts = parts
        self.pooled = [p for layer in parts for p in layer if p.pooled]
        self.slots = max(0, slots)
        self.block_bytes = sum(p.stripes * p.stripe_bytes for p in self.pooled)
        # each stripe's region in the file: `slots` blocks of it
        offset, self.region = 0, {}
        for p in self.pooled:
            for s in range(p.stripes):
                self.region[(p.layer, p.index, s)] = offset
                offset += self.slots * p.stripe_bytes
        self.size = max(offset, PAGE)
        self.shares = _mmap_at is not None
        if self.shares:
            self.fd = os.memfd_create("refmoe-prefix-cache", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self.mem = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
            weakref.finalize(self, os.close, self.fd)
        else:
            self.fd = -1
            self.mem = mmap.mmap(-1, self.size)
        self.bytes = torch.frombuffer(self.mem, dtype=torch.uint8)  # [size]
        self.high = 0  # slots ever handed out
        self.free: list[int] = []  # heap: the lowest first, so runs stay consecutive
        self.pins: Counter[int] = Counter()
        self.released: deque[tuple[int, ...]] = deque()  # appended by finalizers, any thread
        self.pin_lock = threading.Lock()  # a cache that grows pins from its own thread

    @property
    def aliases(self) -> bool:
        """Whether a restore on the CPU maps pages at all (some part is pooled)."""
        return self.shares and bool(self.pooled)

    @property
    def mapped_share(self) -> float:
        """The share of a cache's bytes per position that a restore maps rather than copies
        (1 where every part is pooled; DeepSeek-V4's compressed parts of a row per 128
        positions are copied)."""
        if not self.aliases:
            return 0.0
        per = [(p.stripes * p.row_bytes / p.rate, p.pooled) for ps in self.parts for p in ps]
        total = sum(b for b, _ in per)
        return sum(b for b, pooled in per if pooled) / total if total else 0.0

    # -- slots ----------------------------------------------------------------------------

    def alloc(self) -> int | None:
        if self.free:
            return heapq.heappop(self.free)
        if self.high < self.slots:
            self.high += 1
            return self.high - 1
        return None

    def release(self, slot: int) -> None:
        """The slot's pages go back to the system (its memory is no longer counted)."""
        for p in self.pooled:
            for s in range(p.stripes):
                lo = self.region[(p.layer, p.index, s)] + slot * p.stripe_bytes
                self.mem.madvise(
                    mmap.MADV_REMOVE if self.shares else mmap.MADV_DONTNEED, lo, p.stripe_bytes
                )
        heapq.heappush(self.free, slot)

    def pin(self, slots) -> None:
        with self.pin_lock:
            self.pins.update(slots)

    def drain(self) -> None:
        """Drop the pins the finalizers queued (never in a finalizer: they only queue, so no
        lock is taken where a collection may run)."""
        if not self.released:
            return
        with self.pin_lock:
            while self.released:
                self.pins.subtract(self.released.popleft())
            self.pins = +self.pins  # drop zeros

    def pinned(self, slot: int) -> bool:
        return self.pins[slot] > 0

    def unpin_when_gone(self, owner, slots: tuple[int, ...]) -> None:
        """Pin slots until owner is collected."""
        self.pin(slots)
        weakref.finalize(owner, self.released.append, slots)

    # -- a block's tensors ----------------------------------------------------------------

    def view(self, slot: int, part: Part) -> torch.Tensor:
        """The block in slot, of a pooled part, shaped as KVCache.read gives it (a view of the
        file)."""
        es = part.dtype.itemsize
        first = self.region[(part.layer, part.index, 0)] + slot * part.stripe_bytes
        region = self.slots * part.stripe_bytes // es  # stripes are regions apart
        outer = [s * region for s in _strides(part.outer)]
        row = math.prod(part.inner)
        shape = (*part.outer, part.rows, *part.inner)
        stride = (*outer, row, *_strides(part.inner))
        return self.bytes.view(part.dtype).as_strided(shape, stride, first // es)

    # -- mapping blocks into a request's buffer -------------------------------------------

    def mapped(self, part: Part, slots: list[int], capacity: int) -> torch.Tensor:
        """A buffer of `capacity` rows per stripe ([*outer, capacity, *inner]) whose first
        len(slots) blocks are the slots' pages, read-only, and the rest private memory.
        Raises OSError where the pages cannot be mapped (the caller copies instead)."""
        if _mmap_at is None or not self.shares or not part.pooled:
            raise OSError("these blocks cannot be mapped (not in a shared file)")
        if capacity % part.rows or capacity < len(slots) * part.rows:
            raise ValueError(f"a capacity of {capacity} rows for {len(slots)} blocks")
        stripe_cap = capacity * part.row_bytes  # whole pages: whole blocks of whole pages
        buf = mmap.mmap(
            -1, max(part.stripes * stripe_cap, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        base = _address(buf)
        runs = _runs(slots)
        for s in range(part.stripes):
            region = self.region[(part.layer, part.index, s)]
            for block, first, n in runs:
                at = base + s * stripe_cap + block * part.stripe_bytes
                got = _mmap_at(
                    at,
                    n * part.stripe_bytes,
                    _PROT_READ,
                    _MAP_SHARED | _MAP_FIXED,
                    self.fd,
                    region + first * part.stripe_bytes,
                )
                if got == _MAP_FAILED or got != at:
                    err = ctypes.get_errno()
                    buf.close()
                    raise OSError(err, f"mapping prefix pages: {os.strerror(err)}")
        self.unpin_when_gone(buf, tuple(slots))
        shape = (*part.outer, capacity, *part.inner)
        return torch.frombuffer(buf, dtype=part.dtype).view(shape)


def _strides(shape: tuple[int, ...]) -> list[int]:
    """A contiguous tensor's strides, in elements."""
    out: list[int] = []
    step = 1
    for d in reversed(shape):
        out.insert(0, step)
        step *= d
    return out


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first block, its slot, how many) for each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            b, first, n = runs[-1]
            runs[-1] = (b, first, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs


class SharedPrefix:
    """A prefix of one part held in the pool: what a Growing maps under its buffer (and maps
    again whenever it grows)."""

    def __init__(self, pool: Pool, part: Part, slots: list[int]):
        self.pool, self.part, self.slots = pool, part, list(slots)

    @property
    def rows(self) -> int:
        return len(self.slots) * self.part.rows

    @property
    def nbytes(self) -> int:
        return self.rows * self.part.row_bytes * self.part.stripes

    def buffer(self, capacity: int) -> torch.Tensor:
        """A buffer of at least `capacity` rows (rounded up to whole blocks) with the prefix
        mapped in."""
        rows = self.part.rows
        return self.pool.mapped(self.part, self.slots, -(-capacity // rows) * rows)
