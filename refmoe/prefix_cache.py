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


@dataclass(eq=False, slots=True)
class Block:
    key: bytes
    parent: bytes | None
    tokens: tuple[int, ...]
    tensors: list[list[torch.Tensor]]  # per layer, per growing part (host memory)
    nbytes: int
    children: int = 0


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
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def _key(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class PrefixCache:
    def __init__(self, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if capacity_bytes < 0:
            raise ValueError(f"prefix cache capacity must be >= 0 bytes, got {capacity_bytes}")
        if block_tokens < 1:
            raise ValueError(f"prefix cache block_tokens must be >= 1, got {block_tokens}")
        self.capacity, self.block_tokens = capacity_bytes, block_tokens
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
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

    def match(self, ids: list[int]) -> Hit:
        """The longest cached prefix of ids that leaves at least one token to run."""
        with self.lock:
            self.stats.queries += len(ids)
            found: list[Block] = []
            for key, _, tokens in self._chain(ids, len(ids) - 1):
                blk = self.blocks.get(key)
                if blk is None or blk.tokens != tokens:  # a miss (or a hash collision)
                    break
                found.append(blk)
            for blk in reversed(found):  # parents end up more recent than their children
                self.blocks.move_to_end(blk.key)
            hit = Hit(len(found) * self.block_tokens, found)
            self.stats.hits += hit.tokens
            return hit

    @staticmethod
    def restore(hit: Hit, cache: KVCache, device: torch.device | str = "cpu") -> None:
        """Append the hit's blocks to an empty cache (on the model's device)."""
        import torch

        if not hit.blocks:
            return
        if cache.length:
            raise ValueError("a prefix restores into an empty cache")
        cache.extend(
            [
                [
                    torch.cat([blk.tensors[layer][j] for blk in hit.blocks], dim=g.dim).to(device)
                    for j, g in enumerate(gs)
                ]
                for layer, gs in enumerate(cache.parts())
            ]
        )

    def store(self, ids: list[int], cache: KVCache) -> int:
        """Keep the full blocks of cache (whose positions hold ids[:cache.length]); returns
        how many blocks were new. Copies only blocks not cached yet."""
        upto = min(len(ids), cache.length)
        if self.capacity == 0 or upto < self.block_tokens:
            return 0
        new = 0
        chain = list(self._chain(ids, upto))
        for i, (key, parent, tokens) in enumerate(chain):
            with self.lock:
                blk = self.blocks.get(key)
                if blk is not None and blk.tokens == tokens:
                    self.blocks.move_to_end(key)
                    continue
            lo = i * self.block_tokens
            tensors = [
                [t.to("cpu", copy=True) for t in layer]
                for layer in cache.read(lo, lo + self.block_tokens)
            ]
            nbytes = sum(t.numel() * t.element_size() for layer in tensors for t in layer)
            if nbytes > self.capacity:
                return new
            with self.lock:
                if key in self.blocks:
                    continue  # stored meanwhile
                if parent is not None:
                    if parent not in self.blocks:
                        return new  # its parent was evicted meanwhile: the chain ends here
                    self.blocks.move_to_end(parent)  # not the next to go
                self._evict(self.capacity - nbytes)
                if parent is not None and parent not in self.blocks:
                    return new  # the budget holds no more than the rest of this chain
                self.blocks[key] = Block(key, parent, tokens, tensors, nbytes)
                if parent is not None:
                    self.blocks[parent].children += 1
                self.nbytes += nbytes
                self.stats.stored_blocks += 1
                new += 1
        return new

    def _evict(self, target: int) -> None:
        """Evict least recently used leaves until at most target bytes are held (lock held)."""
        while self.nbytes > target and self.blocks:
            leaf = next((b for b in self.blocks.values() if b.children == 0), None)
            if leaf is None:  # cannot happen in a forest; be safe rather than loop
                break
            del self.blocks[leaf.key]
            self.nbytes -= leaf.nbytes
            self.stats.evicted_blocks += 1
            if leaf.parent is not None and leaf.parent in self.blocks:
                self.blocks[leaf.parent].children -= 1
