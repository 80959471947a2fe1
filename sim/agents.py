"""Agents in the simulator: the engine's prefix cache as the simulator keeps it, and the
question a buyer asks of a box: how many coding agents does it hold?

PrefixModel mirrors refmoe/prefix_cache.py for the agent workload, where conversations share
nothing with each other (each starts with its own context) and everything with their own past:
per conversation, the full blocks of the longest prefix stored (its prompt when prefilled, then
prompt and reply when finished), in host memory at the engine's float32 cache bytes per token,
evicted least recently used, a conversation's blocks together (the engine evicts block by
block, leaves first: for one chain that is the same order). A lookup leaves one token to run,
as the engine's does. A model with linear attention (state_bytes > 0) is cached as the engine
caches it, by snapshots of its state: at a prefilled prompt's marks (refmoe.prefix_cache.
snapshot_marks) and a finished turn's end, each costing the state's bytes beside the tokens'
entries; a lookup finds the last snapshot before the prompt's last token.

capacity() sweeps the number of concurrent conversations through sim.serve.Simulation (the
engine's own scheduler, chunked prefill and prefix lookups) and answers with the largest that
meets a TTFT and a per-user decode speed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from refmoe.config import ModelConfig
from refmoe.prefix_cache import BLOCK_TOKENS, snapshot_marks
from refmoe.serving_metrics import agent_summary, agent_workload
from sim.costs import kv_bytes_per_token
from sim.hardware import Hardware


def host_bytes_per_token(cfg: ModelConfig) -> int:
    """What the engine's prefix cache keeps per token: its cache in float32, every layer."""
    return 2 * kv_bytes_per_token(cfg) * cfg.num_hidden_layers


class PrefixModel:
    def __init__(
        self,
        capacity_bytes: int,
        bytes_per_token: int,
        block: int = BLOCK_TOKENS,
        state_bytes: int = 0,
        snapshot_every: int = 1,
    ):
        """state_bytes, snapshot_every: a linear-attention model's state and the spacing of a
        long prompt's snapshots (as refmoe.engine sets them: the state in tokens of KV)."""
        self.capacity, self.per, self.block = capacity_bytes, bytes_per_token, block
        self.state = state_bytes
        self.every = -(-max(snapshot_every, 1) // block) * block
        self.held: OrderedDict[int, int] = OrderedDict()  # conversation -> tokens, LRU first
        self.snaps: dict[int, list[int]] = {}  # conversation -> its snapshots' positions
        self.queries = self.hits = self.evictions = 0

    def _bytes(self, conversation: int) -> int:
        held = self.held.get(conversation, 0)
        return held * self.per + len(self.snaps.get(conversation, ())) * self.state

    @property
    def nbytes(self) -> int:
        return sum(self._bytes(c) for c in self.held)

    def match(self, conversation: int, prompt: int) -> int:
        """Cached tokens for a prompt of this conversation (its history is a prefix)."""
        self.queries += prompt
        have = self.held.get(conversation, 0)
        if have:
            self.held.move_to_end(conversation)
        if self.state:
            got = max((p for p in self.snaps.get(conversation, ()) if p < prompt), default=0)
        else:
            got = min(have, (prompt - 1) // self.block * self.block)
        self.hits += got
        return got

    def store(self, conversation: int, tokens: int, cached: int | None = None) -> None:
        """The conversation's first `tokens` tokens are cached (its full blocks kept): a
        prompt just prefilled after `cached` restored tokens, or (cached None) a finished
        turn. With linear attention: snapshots at the prompt's marks, or the turn's end."""
        if self.state:
            new = [tokens] if cached is None else snapshot_marks(tokens, cached, self.every)
            was = (self.held.get(conversation, 0), self.snaps.get(conversation, []))
            snaps = sorted(set(was[1]) | set(new))
            if not snaps:
                return
            self.held[conversation], self.snaps[conversation] = max(was[0], snaps[-1]), snaps
            if self._bytes(conversation) > self.capacity:  # not kept: as it was
                self.held[conversation], self.snaps[conversation] = was
                if not was[1]:
                    del self.held[conversation], self.snaps[conversation]
                return
        else:
            full = tokens // self.block * self.block
            if full <= self.held.get(conversation, 0) or full * self.per > self.capacity:
                return
            self.held[conversation] = full
        self.held.move_to_end(conversation)
        while self.nbytes > self.capacity:
            victim = next(iter(self.held))
            if victim == conversation:
                break
            del self.held[victim]
            self.snaps.pop(victim, None)
            self.evictions += 1


@dataclass(slots=True)
class Verdict:
    conversations: int
    mean_ttft_s: float
    p90_ttft_s: float
    decode_tok_s: float  # the slowest 10% of users' decode speed (p10)
    ok: bool


def capacity(
    cfg: ModelConfig,
    hw: Hardware,
    ttft_s: float = 10.0,
    tok_s: float = 15.0,
    turns: int = 4,
    context: int = 4096,
    new_tokens: tuple[int, int] = (200, 400),
    output_tokens: tuple[int, int] = (64, 256),
    think_s: tuple[float, float] = (2.0, 10.0),
    most: int = 64,
    seed: int = 0,
    **sim_kw,
) -> tuple[int, list[Verdict]]:
    """The most concurrent agents (conversations) whose turns see a p90 TTFT within ttft_s and
    whose slowest 10% decode at tok_s or more, doubling from 1 to `most`, then bisecting.
    Returns (that number, 0 if even one does not fit; every verdict tried, by size)."""
    from sim.serve import Simulation

    tried: dict[int, Verdict] = {}

    def judge(n: int) -> bool:
        convos = agent_workload(n, turns, context, new_tokens, output_tokens, think_s, seed)
        run = Simulation(cfg, hw, [], conversations=convos, **sim_kw).run()
        s = agent_summary(run.records, run.duration_s)
        ttfts = sorted(r.outcome.ttft_s for r in run.records if r.outcome.ttft_s is not None)
        speeds = sorted(
            (r.outcome.output_tokens - 1) / (r.outcome.e2e_s - r.outcome.ttft_s)
            for r in run.records
            if r.outcome.ok and r.outcome.output_tokens > 1 and r.outcome.e2e_s > r.outcome.ttft_s
        )
        p90 = ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else float("inf")
        p10 = speeds[int(0.1 * len(speeds))] if speeds else 0.0
        ok = s["failed"] == 0 and p90 <= ttft_s and p10 >= tok_s
        tried[n] = Verdict(n, s["mean_ttft_ms"] / 1e3, p90, p10, ok)
        return ok

    if not judge(1):
        return 0, list(tried.values())
    lo, hi = 1, None
    n = 2
    while n <= most:
        if judge(n):
            lo, n = n, 2 * n
        else:
            hi = n
            break
    if hi is None:
        return lo, [tried[k] for k in sorted(tried)]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if judge(mid):
            lo = mid
        else:
            hi = mid
    return lo, [tried[k] for k in sorted(tried)]
