"""The prefix cache: finished and running requests' KV caches kept in host memory, by token
prefix, so that a request that starts with tokens already seen (an agent's next turn resends
the whole conversation) prefills only what is new.

    blocks       the cache is kept in blocks of `block_tokens` tokens; a block's key is a hash
                 of its parent's key and its own tokens (vLLM's hashed blocks), so a key names
                 the whole prefix up to the block's end, and two requests that share a prefix
                 share its blocks (each stored once)
    match        the longest run of cached blocks that starts the prompt, leaving at least one
                 token to run (the first generated token needs the last prompt token's logits)
    restore      copies those blocks into a fresh cache (the engine's caches are contiguous
                 growing tensors, so a hit costs one copy of the prefix, not a prefill)
    store        copies the full blocks of a cache that are not cached yet; the ones that are
                 are only touched
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

A Hit holds its blocks' tensors, so a block evicted after a match is still whole for the
request that matched it (its memory returns when that request has restored it); nothing a
request reads is freed under it. Thread-safe: the engine's workers call it from their threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is loaded where caches exist; the simulator reads BLOCK_TOKENS only
    import torch

    from refmoe.models.kv_cache import KVCache

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


@dataclass(slots=True)
class Hit:
    """A match: the cached prefix's length in tokens, and its blocks, in order."""

    tokens: int = 0
    blocks: list[Block] = field(default_factory=list)


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

    @staticmethod
    def restore(hit: Hit, cache: KVCache, device: torch.device | str = "cpu") -> None:
        """Put the hit's prefix into an empty cache (on the model's device): the positional
        layers' entries, and for a cache with recurrent layers, their snapshotted states."""
        import torch

        if not hit.blocks:
            return
        states = hit.blocks[-1].states
        if cache.recurrent_layers() and states is None:
            raise ValueError("a cache with recurrent layers restores only a hit on a snapshot")
        layers = [
            [
                torch.cat([blk.tensors[layer][j] for blk in hit.blocks], dim=g.dim).to(device)
                for j, g in enumerate(gs)
            ]
            for layer, gs in enumerate(cache.parts())
        ]
        moved = [tuple(t.to(device) for t in state) for state in states or []]
        cache.restore(layers, moved, hit.tokens)

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
            with self.lock:
                blk = self.blocks.get(key)
                if blk is not None and blk.tokens == tokens:
                    self.blocks.move_to_end(key)
                    continue
            lo = i * self.block_tokens
            block = self._copy(key, parent, tokens, cache.read(lo, lo + self.block_tokens))
            held = self._insert(block)
            if held is None:
                return new, False
            new += held
        return new, True

    def _store_snapshot(self, parent, ids, base: int, end: int, cache: KVCache, states) -> int:
        """A snapshot at end under the block parent (None: the root) that ends at base."""
        tail = tuple(ids[base:end])
        key = _key(parent, tail, snapshot=True)
        with self.lock:
            if key in self.blocks:
                self.blocks.move_to_end(key)
                return 0
        block = self._copy(key, parent, tail, cache.read(base, end), states)
        held = self._insert(block)
        if held:
            self.stats.stored_snapshots += 1
        return int(bool(held))

    @staticmethod
    def _copy(key, parent, tokens, layers, states=None) -> Block:
        """A block of host copies of a cache's entries (and states)."""
        tensors = [[t.to("cpu", copy=True) for t in layer] for layer in layers]
        kept = None
        if states is not None:
            kept = [tuple(t.to("cpu", copy=True) for t in state) for state in states]
        nbytes = sum(t.numel() * t.element_size() for layer in tensors for t in layer)
        nbytes += sum(t.numel() * t.element_size() for state in kept or [] for t in state)
        return Block(key, parent, tokens, tensors, nbytes, states=kept)

    def _insert(self, blk: Block) -> bool | None:
        """Keep blk, evicting to make room: True if kept, False if it was already there, None
        if it cannot be kept (too big, or its parent is gone)."""
        if blk.nbytes > self.capacity:
            return None
        with self.lock:
            if blk.key in self.blocks:
                self.blocks.move_to_end(blk.key)
                return False  # stored meanwhile
            parent = blk.parent
            if parent is not None:
                if parent not in self.blocks:
                    return None  # its parent was evicted meanwhile: the chain ends here
                self.blocks.move_to_end(parent)  # not the next to go
            self._evict(self.capacity - blk.nbytes)
            if parent is not None and parent not in self.blocks:
                return None  # the budget holds no more than the rest of this chain
            self.blocks[blk.key] = blk
            if parent is not None:
                self.blocks[parent].children += 1
            if blk.states is not None:
                self.snaps.setdefault(parent, set()).add(blk.key)
            self.nbytes += blk.nbytes
            self.stats.stored_blocks += 1
            return True

    def _evict(self, target: int) -> None:
        """Evict least recently used leaves until at most target bytes are held (lock held)."""
        while self.nbytes > target and self.blocks:
            leaf = next((b for b in self.blocks.values() if b.children == 0), None)
            if leaf is None:  # cannot happen in a forest; be safe rather than loop
                break
            del self.blocks[leaf.key]
            self.nbytes -= leaf.nbytes
            self.stats.evicted_blocks += 1
            if leaf.states is not None:
                under = self.snaps[leaf.parent]
                under.discard(leaf.key)
                if not under:
                    del self.snaps[leaf.parent]
            if leaf.parent is not None and leaf.parent in self.blocks:
                self.blocks[leaf.parent].children -= 1
