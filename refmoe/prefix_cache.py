"""The prefix cache: finished and running requests' KV caches kept in host memory, by token
prefix, so that a request that starts with tokens already seen (an agent's next turn resends
the whole conversation) prefills only what is new.

    blocks       the cache is kept in blocks of `block_tokens` tokens; a block's key is a hash
                 of its parent's key and its own tokens (vLLM's hashed blocks), so a key names
                 the whole prefix up to the block's end, and two requests that share a prefix
                 share its blocks (each stored once)
    match        the longest run of cached blocks that starts the prompt, leaving at least one
                 token to run (the first generated token needs the last prompt token's logits)
    pages        full blocks live in one shared-memory file (refmoe/models/pages.py), a slot
                 per block, each layer's parts stripe-major
    restore      on the CPU maps those blocks' pages at the start of a fresh cache's buffers
                 (copy-free: every request with the prefix reads the same memory, held once,
                 and writes only after it); on a GPU, or for a part whose block is not whole
                 pages, copies them (the engine's caches are contiguous growing tensors)
    store        copies the full blocks of a cache that are not cached yet into free slots;
                 the ones that are are only touched
    pins         a match pins its blocks until it is restored, a mapped cache until it is
                 gone: a pinned block is never evicted, so no page is rewritten under a reader
    eviction     least recently used, leaves first: a match touches a chain from its end back
                 to its start, so a parent is always more recent than its children, and only
                 blocks with no cached children are evicted

    snapshots    a cache with recurrent layers (linear attention: Qwen3-Next, Qwen3.5; sliding
                 windows: gpt-oss, DeepSeek-V4) has no prefix to cut out of their state, so
                 it is kept at chosen positions instead:
                 a snapshot is a leaf under the full block its position falls after, holding
                 the tokens past that block (the tail, fewer than a block), the positional
                 layers' entries for them, and every recurrent layer's tensors at that
                 position. Positions: the prompt's last but one token (so an agent's next turn,
                 or the same prompt again, finds it), every `snapshot_every` tokens of a long
                 prompt (so requests that share only a long system prompt share it) and the
                 end of a finished request. A match for such a model is the longest prefix
                 that ends at a snapshot; the state is restored, the rest prefilled.

A Hit pins its blocks (and holds a snapshot's own tensors), so a block is still whole for the
request that matched it; nothing a request reads is evicted or rewritten under it. The bytes
counted (`nbytes`, held under the capacity) are every cached block's, shared pages once.
Thread-safe: the engine's workers call it from their threads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is loaded where caches exist; the simulator reads BLOCK_TOKENS only
    import torch

    from refmoe.models.kv_cache import KVCache
    from refmoe.models.pages import Pool

log = logging.getLogger(__name__)

BLOCK_TOKENS = 32
SNAPSHOT_BLOCKS = 64  # a long prompt's snapshots, blocks apart, unless the engine says


@dataclass(eq=False, slots=True)
class Block:
    key: bytes
    parent: bytes | None
    tokens: tuple[int, ...]
    tensors: list[list[torch.Tensor]]  # per layer, per growing part (host memory)
    nbytes: int
    children: int = 0
    states: list | None = None  # a snapshot: per recurrent layer its tensors at its end
    slot: int | None = None  # a full block's place in the pool (its pooled parts' pages)


@dataclass(slots=True, weakref_slot=True)
class Hit:
    """A match: the cached prefix's length in tokens, and its blocks, in order (pinned until
    the hit is gone)."""

    tokens: int = 0
    blocks: list[Block] = field(default_factory=list)

    @property
    def slots(self) -> list[int]:
        """The slots of its leading full blocks (a snapshot, last, has none)."""
        return [b.slot for b in self.blocks if b.slot is not None]


@dataclass(slots=True)
class Stats:
    """Counters since start (tokens, as vLLM counts prefix-cache queries and hits)."""

    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found cached
    stored_blocks: int = 0  # snapshots included
    evicted_blocks: int = 0
    stored_snapshots: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def _key(parent: bytes | None, tokens: tuple[int, ...], snapshot: bool = False) -> bytes:
    h = hashlib.blake2b((b"snapshot" if snapshot else b"") + (parent or b""), digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


def snapshot_marks(prompt_tokens: int, cached: int, every: int) -> list[int]:
    """Where a prompt prefilled after its first `cached` tokens has its recurrent layers'
    state snapshotted: every `every` tokens, and its last token but one."""
    last = prompt_tokens - 1
    periodic = range(every * (cached // every + 1), last, every)
    return [p for p in [*periodic, last] if p > cached]


class PrefixCache:
    def __init__(
        self,
        capacity_bytes: int,
        block_tokens: int = BLOCK_TOKENS,
        snapshot_every: int | None = None,
    ):
        """snapshot_every: how many prompt tokens apart a long prompt's snapshots are (for
        caches with recurrent layers; rounded up to whole blocks; None: one block's worth of
        tokens times SNAPSHOT_BLOCKS)."""
        if capacity_bytes < 0:
            raise ValueError(f"prefix cache capacity must be >= 0 bytes, got {capacity_bytes}")
        if block_tokens < 1:
            raise ValueError(f"prefix cache block_tokens must be >= 1, got {block_tokens}")
        every = snapshot_every if snapshot_every is not None else SNAPSHOT_BLOCKS * block_tokens
        if every < 1:
            raise ValueError(f"prefix cache snapshot_every must be >= 1 token, got {every}")
        self.capacity, self.block_tokens = capacity_bytes, block_tokens
        self.snapshot_every = -(-every // block_tokens) * block_tokens
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.snaps: dict[bytes | None, set[bytes]] = {}  # a block's key -> its snapshots' keys
        self.nbytes = 0
        self.stats = Stats()
        self.lock = threading.Lock()
        self.pool: Pool | None = None  # made for the first cache stored (its parts' layout)

    def shared_tokens(self, hit: Hit, device: torch.device | str = "cpu") -> int:
        """How many of the hit's tokens a restore into a cache on device maps rather than
        copies, in whole tokens' worth of cache (the KV budget counts them once, here, not per
        request; a cache some of whose parts are copied shares that much less)."""
        import torch

        pool = self.pool
        if pool is None or not pool.aliases or torch.device(device).type != "cpu":
            return 0
        return int(len(hit.slots) * self.block_tokens * pool.mapped_share)

    def __len__(self) -> int:
        return len(self.blocks)

    def _chain(self, ids: list[int], upto: int):
        """(key, parent, tokens) of each full block of ids[:upto]."""
        parent, b = None, self.block_tokens
        for lo in range(0, upto - upto % b, b):
            tokens = tuple(ids[lo : lo + b])
            key = _key(parent, tokens)
            yield key, parent, tokens
            parent = key

    def marks(self, prompt_tokens: int, cached: int) -> list[int]:
        """Where a prompt's recurrent layers keep snapshots as it is prefilled after its first
        `cached` tokens (snapshot_marks)."""
        return snapshot_marks(prompt_tokens, cached, self.snapshot_every)

    def match(self, ids: list[int], recurrent: bool = False) -> Hit:
        """The longest cached prefix of ids that leaves at least one token to run; for a cache
        with recurrent layers, the longest that ends at a snapshot."""
        with self.lock:
            self.stats.queries += len(ids)
            found: list[Block] = []
            for key, _, tokens in self._chain(ids, len(ids) - 1):
                blk = self.blocks.get(key)
                if blk is None or blk.tokens != tokens:  # a miss (or a hash collision)
                    break
                found.append(blk)
            hit = Hit(len(found) * self.block_tokens, found)
            if recurrent:
                hit = self._snapshot_hit(ids, found)
            for blk in reversed(hit.blocks):  # parents end up more recent than their children
                self.blocks.move_to_end(blk.key)
            self.stats.hits += hit.tokens
            if self.pool is not None and hit.slots:
                self.pool.unpin_when_gone(hit, tuple(hit.slots))
            return hit

    def _snapshot_hit(self, ids: list[int], found: list[Block]) -> Hit:
        """The longest snapshot under the found chain whose tail ids continue with (lock held)."""
        best = Hit()
        for depth in range(len(found) + 1):
            parent, base = (found[depth - 1].key if depth else None), depth * self.block_tokens
            for key in self.snaps.get(parent, ()):
                snap = self.blocks[key]
                end = base + len(snap.tokens)
                if best.tokens < end < len(ids) and tuple(ids[base:end]) == snap.tokens:
                    best = Hit(end, found[:depth] + [snap])
        return best

    def restore(self, hit: Hit, cache: KVCache, device: torch.device | str = "cpu") -> None:
        """Put the hit's prefix into an empty cache (on the model's device): the positional
        layers' entries (on the CPU its full blocks mapped, not copied, where every part's
        blocks are whole pages), and for a cache with recurrent layers, their snapshotted
        states."""
        if not hit.blocks:
            return
        states = hit.blocks[-1].states
        if cache.recurrent_layers() and states is None:
            raise ValueError("a cache with recurrent layers restores only a hit on a snapshot")
        moved = [tuple(t.to(device) for t in state) for state in states or []]
        if self.shared_tokens(hit, device):
            try:
                self._restore(hit, cache, device, moved, share=True)
                return
            except OSError as e:  # no more mappings (vm.max_map_count): copy instead
                log.warning("prefix cache: restoring by copy (%s)", e)
                for g in (g for gs in cache.parts() for g in gs):
                    g.clear()
        self._restore(hit, cache, device, moved, share=False)

    def _restore(self, hit: Hit, cache: KVCache, device, moved: list, share: bool) -> None:
        import torch

        from refmoe.models.pages import SharedPrefix

        full, pool = (len(hit.slots) if share else 0), self.pool
        layers, shared = [], []
        for layer, gs in enumerate(cache.parts()):
            row, prefixes = [], []
            for j, g in enumerate(gs):
                part = pool.parts[layer][j] if pool is not None and share else None
                prefix = None
                if pool is not None and part is not None and part.pooled:
                    prefix = SharedPrefix(pool, part, hit.slots)
                rest = hit.blocks[full:] if prefix is not None else hit.blocks
                tensors = [blk.tensors[layer][j] for blk in rest]
                if not tensors:  # all of it mapped
                    tensors = [hit.blocks[0].tensors[layer][j].narrow(g.dim, 0, 0)]
                row.append(torch.cat(tensors, dim=g.dim).to(device))
                prefixes.append(prefix)
            layers.append(row)
            shared.append(prefixes)
        cache.restore(layers, moved, hit.tokens, shared if full else None)

    def store(self, ids: list[int], cache: KVCache, now: bool = False) -> int:
        """Keep the full blocks of cache (whose positions hold ids[:cache.length]); returns
        how many blocks (snapshots included) were new. Copies only blocks not cached yet. A
        cache with recurrent layers keeps the snapshots its marks took, and with now=True its
        state at its end, each with the blocks before it (no others: without a snapshot
        after them they could not be restored)."""
        upto = min(len(ids), cache.length)
        if self.capacity == 0:
            return 0
        if not cache.recurrent_layers():
            return self._store_chain(list(self._chain(ids, upto)), 0, cache)[0]
        snapshots = cache.snapshots()
        if now and cache.length <= len(ids):
            snapshots[cache.length] = cache.states()
        ends = sorted(p for p in snapshots if 0 < p <= upto)
        b = self.block_tokens
        chain = list(self._chain(ids, ends[-1] - ends[-1] % b)) if ends else []
        new, depth = 0, 0
        for end in ends:
            stored, whole = self._store_chain(chain[: end // b], depth, cache)
            new, depth = new + stored, end // b
            if not whole:
                break
            parent = chain[depth - 1][0] if depth else None
            new += self._store_snapshot(parent, ids, depth * b, end, cache, snapshots[end])
        return new

    def _store_chain(self, chain: list, start: int, cache: KVCache) -> tuple[int, bool]:
        """The blocks chain[start:] (from _chain): (how many were new, whether all are held
        now)."""
        new = 0
        for i in range(start, len(chain)):
            key, parent, tokens = chain[i]
            lo = i * self.block_tokens
            held = self._insert(key, parent, tokens, cache, lo, lo + self.block_tokens)
            if held is None:
                return new, False
            new += held
        return new, True

    def _store_snapshot(self, parent, ids, base: int, end: int, cache: KVCache, states) -> int:
        """A snapshot at end under the block parent (None: the root) that ends at base."""
        tail = tuple(ids[base:end])
        key = _key(parent, tail, snapshot=True)
        held = self._insert(key, parent, tail, cache, base, end, states)
        if held:
            self.stats.stored_snapshots += 1
        return int(bool(held))

    def _pool(self, cache: KVCache) -> Pool:
        """The pool, made for the first cache stored: every cache of a model has its parts
        (lock held)."""
        from refmoe.models.pages import Pool, layout

        if self.pool is None:
            parts = layout(cache.parts(), self.block_tokens)
            pool = Pool(parts, 0)
            slots = self.capacity // pool.block_bytes if pool.block_bytes else 0
            self.pool = Pool(parts, slots)
        return self.pool

    def _insert(self, key, parent, tokens, cache: KVCache, lo: int, hi: int, states=None):
        """Keep positions lo .. hi of cache (tokens, under the block parent; with states a
        snapshot, else a full block), evicting to make room: True if kept, False if it was
        there already, None if it cannot be kept (too big, its parent is gone, or every
        block left is pinned). Copies under the lock: no reader sees a block half written."""
        layers = cache.read(lo, hi)
        with self.lock:
            pool = self._pool(cache)
            pool.drain()
            blk = self.blocks.get(key)
            if blk is not None and blk.tokens == tokens:
                self.blocks.move_to_end(key)
                return False
            full = states is None and pool.block_bytes > 0
            own = [
                [t for t, part in zip(layer, parts) if not (full and part.pooled)]
                for layer, parts in zip(layers, pool.parts)
            ]
            nbytes = sum(t.numel() * t.element_size() for layer in own for t in layer)
            nbytes += sum(t.numel() * t.element_size() for state in states or [] for t in state)
            nbytes += pool.block_bytes if full else 0
            if nbytes > self.capacity:
                return None
            if parent is not None:
                if parent not in self.blocks:
                    return None  # its parent was evicted meanwhile: the chain ends here
                self.blocks.move_to_end(parent)  # not the next to go
            self._evict(self.capacity - nbytes)
            if self.nbytes + nbytes > self.capacity:
                return None  # what is left is pinned by requests reading it
            if parent is not None and parent not in self.blocks:
                return None  # the budget holds no more than the rest of this chain
            slot = pool.alloc() if full else None
            if full and slot is None:
                return None
            tensors = []
            for layer, parts in zip(layers, pool.parts):
                kept = []
                for t, part in zip(layer, parts):
                    if slot is not None and part.pooled:
                        kept.append(pool.view(slot, part))
                        kept[-1].copy_(t)
                    else:
                        kept.append(t.to("cpu", copy=True))
                tensors.append(kept)
            kept_states = None
            if states is not None:
                kept_states = [tuple(t.to("cpu", copy=True) for t in st) for st in states]
            blk = Block(key, parent, tokens, tensors, nbytes, states=kept_states, slot=slot)
            self.blocks[key] = blk
            if parent is not None:
                self.blocks[parent].children += 1
            if states is not None:
                self.snaps.setdefault(parent, set()).add(key)
            self.nbytes += nbytes
            self.stats.stored_blocks += 1
            return True

    def _evict(self, target: int) -> None:
        """Evict least recently used leaves not pinned until at most target bytes are held
        (lock held)."""
        pool = self.pool
        while self.nbytes > target and self.blocks:
            leaf = next(
                (
                    b
                    for b in self.blocks.values()
                    if b.children == 0 and not (b.slot is not None and pool and pool.pinned(b.slot))
                ),
                None,
            )
            if leaf is None:  # every leaf is pinned by a request reading it
                break
            del self.blocks[leaf.key]
            self.nbytes -= leaf.nbytes
            self.stats.evicted_blocks += 1
            if leaf.slot is not None and pool is not None:
                pool.release(leaf.slot)
            if leaf.states is not None:
                under = self.snaps[leaf.parent]
                under.discard(leaf.key)
                if not under:
                    del self.snaps[leaf.parent]
            if leaf.parent is not None and leaf.parent in self.blocks:
                self.blocks[leaf.parent].children -= 1
