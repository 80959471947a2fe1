"""The caches a decoder keeps per sequence: Growing (a tensor that grows by appending, capacity
doubling) and KVCache (one cache per layer, of the family's own kind: MLA's latent, GQA's keys
and values)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from refmoe.models.pages import SharedPrefix


class Growing:
    """A tensor that grows along one dimension by appending; capacity doubles, so a decode step
    writes its own token instead of copying the whole cache (torch.cat would). rate: positions
    per row (1: a row per position; DeepSeek-V4's compressed entries: one per `rate`
    positions, the row of positions (i - 1) rate .. i rate - 1 written once the i-th window has
    closed, so a cache of n positions holds n // rate of them).

    shared: a prefix restored from the prefix cache copy-free (refmoe/models/pages.py): its
    rows are the cache file's pages mapped read-only at the start of the buffer, so it grows
    into a new buffer with the prefix mapped again and only its own rows copied."""

    def __init__(self, dim: int, rate: int = 1):
        if rate < 1:
            raise ValueError(f"a growing cache holds a row per >= 1 positions, got rate {rate}")
        self.dim, self.n, self.rate = dim, 0, rate
        self.buf: torch.Tensor | None = None
        self.shared: SharedPrefix | None = None

    def share(self, prefix: SharedPrefix) -> None:
        """Start an empty cache with a prefix of the prefix cache's, mapped, not copied."""
        if self.n:
            raise ValueError("a shared prefix starts an empty cache")
        self.buf = prefix.buffer(max(2 * prefix.rows, 64))
        self.shared, self.n = prefix, prefix.rows

    def clear(self) -> None:
        """Empty again (a restore that could not map its prefix starts over)."""
        self.buf, self.shared, self.n = None, None, 0

    @property
    def own_nbytes(self) -> int:
        """The memory of the buffer that is its own (a shared prefix's pages are the prefix
        cache's)."""
        if self.buf is None:
            return 0
        return self.buf.untyped_storage().nbytes() - (self.shared.nbytes if self.shared else 0)

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append x; return the whole contents (a view)."""
        t = x.shape[self.dim]
        if self.buf is None or self.n + t > self.buf.shape[self.dim]:
            rows = max(2 * (self.n + t), 64)
            if self.shared is not None:
                grown, mine = self.shared.buffer(rows), self.shared.rows
            else:
                shape = list(x.shape)
                shape[self.dim] = rows
                grown, mine = x.new_empty(shape), 0
            if self.buf is not None and self.n > mine:
                own = self.buf.narrow(self.dim, mine, self.n - mine)
                grown.narrow(self.dim, mine, self.n - mine).copy_(own)
            self.buf = grown
        grown = self.buf
        grown.narrow(self.dim, self.n, t).copy_(x)
        self.n += t
        return self.view()

    def view(self) -> torch.Tensor:
        if self.buf is None:
            raise ValueError("an empty cache has no view (append first)")
        return self.buf.narrow(self.dim, 0, self.n)


@dataclass(slots=True)
class Snapshotted:
    """A layer cache of fixed size per sequence (a linear-attention layer's state, a sliding
    layer's window, DeepSeek-V4's window and open compressor windows): the tensors named by
    PARTS and how many tokens they have seen. No prefix can be cut out of them at an earlier
    position, so a prefix cache keeps snapshots instead: `marks` are the positions (tokens
    seen) at which the layer keeps its PARTS in `snaps` as a prompt passes them. The tensors
    are replaced, never written in place, so a snapshot or a reader keeps what it took. A
    subclass may hold Growing fields beside them (positional, read and restored as any
    cache's)."""

    PARTS: ClassVar[tuple[str, ...]] = ("a", "b")  # the subclass's tensor fields
    n: int = 0
    marks: list[int] = field(default_factory=list)
    snaps: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    recurrent = True  # not position-indexed: no prefix can be cut out of it

    @property
    def length(self) -> int:
        return self.n

    def now(self) -> tuple[torch.Tensor, ...]:
        """The PARTS after the tokens seen so far."""
        parts = tuple(getattr(self, name) for name in self.PARTS)
        if any(t is None for t in parts):
            raise ValueError(f"an empty {type(self).__name__} has nothing to snapshot")
        return parts

    def set(self, n: int, *parts: torch.Tensor) -> None:
        """Start from a snapshot taken after n tokens (copies: the snapshot stays whole)."""
        if len(parts) != len(self.PARTS):
            raise ValueError(
                f"a {type(self).__name__} snapshot is {len(self.PARTS)} tensors "
                f"{self.PARTS}, got {len(parts)}"
            )
        self.n = n
        for name, t in zip(self.PARTS, parts):
            setattr(self, name, t.clone())


@dataclass(slots=True)
class KVCache:
    """One cache per layer, of the family's own kind (latent for MLA, k/v for GQA)."""

    layers: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def positional(self) -> bool:
        """Whether every layer's cache holds one entry per position, so that any prefix of it
        can be read out and restored (parts, read, extend); a recurrent layer's state
        (linear attention) cannot be cut at an earlier position: a prefix of a cache with
        recurrent layers is its positional layers' entries plus the recurrent layers' states
        snapshotted at that position (mark, snapshots, states)."""
        return not self.recurrent_layers()

    def nbytes(self) -> int:
        """The memory the cache holds: every tensor and growing buffer of its layers (their
        storages, each once; a growing buffer's whole capacity less a shared prefix, which
        the prefix cache holds), snapshots not taken yet included."""
        seen: dict[int, int] = {}

        def hold(t) -> None:
            if isinstance(t, Growing):
                if t.buf is not None:
                    seen[t.buf.untyped_storage().data_ptr()] = t.own_nbytes
                return
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            elif isinstance(t, (tuple, list)):
                for x in t:
                    hold(x)
            elif isinstance(t, dict):
                hold(list(t.values()))

        for c in self.layers:
            for f in fields(c):
                hold(getattr(c, f.name))
        return sum(seen.values())

    def recurrent_layers(self) -> list:
        return [c for c in self.layers if getattr(c, "recurrent", False)]

    def parts(self) -> list[list[Growing]]:
        """Per layer, the growing tensors its cache holds (MLA: the latent; GQA: keys and
        values; a recurrent layer: none), in a fixed order: what a prefix cache copies out and
        back."""
        return [
            [getattr(c, f.name) for f in fields(c) if isinstance(getattr(c, f.name), Growing)]
            for c in self.layers
        ]

    def read(self, lo: int, hi: int) -> list[list[torch.Tensor]]:
        """Positions lo .. hi of every layer's tensors (views: copy them to keep them): rows
        lo // rate .. hi // rate of a part with a row per `rate` positions, so reads of
        consecutive ranges put together hold what one read of their whole span holds; a
        recurrent layer's state has none (its state at a position is a snapshot)."""
        if not 0 <= lo <= hi <= self.length:
            raise ValueError(f"positions {lo}..{hi} outside a cache of {self.length}")
        return [
            [g.view().narrow(g.dim, lo // g.rate, hi // g.rate - lo // g.rate) for g in layer]
            for layer in self.parts()
        ]

    def extend(self, layers: list[list[torch.Tensor]]) -> None:
        """Append per-layer tensors shaped as read() gives them (the next positions)."""
        if not self.positional:
            raise ValueError(
                "a cache with recurrent layers (linear attention) cannot be appended to: "
                "restore a prefix with its states into an empty one (restore)"
            )
        self._append(layers)

    def restore(
        self,
        layers: list[list[torch.Tensor]],
        states: list,
        length: int,
        shared: list[list[SharedPrefix | None]] | None = None,
    ) -> None:
        """Into an empty cache: a prefix of `length` positions, as read() gives them, and
        (when it has recurrent layers) their PARTS snapshotted at that length. shared: per
        layer and part, a prefix mapped from the prefix cache first (None: none), `layers`
        then holding only what follows it."""
        recurrent = self.recurrent_layers()
        if self.length or any(g.n for gs in self.parts() for g in gs):
            raise ValueError("a prefix restores into an empty cache")
        if len(states) != len(recurrent):
            raise ValueError(f"{len(recurrent)} recurrent layers, {len(states)} states given")
        if shared is not None:
            mine = self.parts()
            if len(shared) != len(mine) or any(len(a) != len(b) for a, b in zip(shared, mine)):
                raise ValueError("the shared prefixes do not match this cache's layers")
            for gs, prefixes in zip(mine, shared):
                for g, prefix in zip(gs, prefixes):
                    if prefix is not None:
                        g.share(prefix)
        self._append(layers)
        for g in (g for gs in self.parts() for g in gs):
            if g.n != length // g.rate:
                raise ValueError(
                    f"the prefix holds {g.n * g.rate} positions (rows of {g.rate}), not {length}"
                )
        for c, state in zip(recurrent, states):
            c.set(length, *state)

    def _append(self, layers: list[list[torch.Tensor]]) -> None:
        mine = self.parts()
        if len(layers) != len(mine) or any(len(a) != len(b) for a, b in zip(layers, mine)):
            raise ValueError("the tensors do not match this cache's layers")
        for gs, ts in zip(mine, layers):
            for g, t in zip(gs, ts):
                g.append(t)

    # -- recurrent layers' snapshots (the prefix cache's view of linear attention) ---------

    def mark(self, positions: list[int]) -> None:
        """Have every recurrent layer keep its state as a prompt passes these positions."""
        for c in self.recurrent_layers():
            c.marks = sorted(set(positions))

    def snapshots(self) -> dict[int, list]:
        """Take the states the marks kept: position -> per recurrent layer its PARTS, for
        the positions every recurrent layer has passed."""
        recurrent = self.recurrent_layers()
        if not recurrent:
            return {}
        common = set.intersection(*(set(c.snaps) for c in recurrent))
        taken = {p: [c.snaps[p] for c in recurrent] for p in sorted(common)}
        for c in recurrent:
            c.snaps = {p: v for p, v in c.snaps.items() if p not in common}
        return taken

    def states(self) -> list:
        """Per recurrent layer, its PARTS now (at self.length): (conv, state) for linear
        attention."""
        return [c.now() for c in self.recurrent_layers()]
