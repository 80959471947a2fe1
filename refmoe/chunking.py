"""How much of a CPU-path prompt rides along each decode step (chunked prefill), from step
times measured as the engine runs, not from a constant.

On a machine whose CPU runs both the decode steps and the prefill, whatever the prefill takes
the decoding requests lose. Two numbers bound what they lose:

    slowdown   the mean time per output token while a prompt prefills, over the time alone
               (default 1.2): the prefill may add (slowdown - 1) of the decode time spent
    stall      the most one chunk may add to one decode step, in decode steps (default 2): the
               worst inter-token gap is about (1 + stall) steps

The rule keeps, per decode batch size, a moving average of the decode-only step time (t_d) and,
from the steps that carried a chunk, of the time each prompt token added (c). A chunk is
n = stall * t_d / c tokens (at least 1). A debt paces the chunks: a step with a chunk adds its
extra time, a step without one pays back (slowdown - 1) of its time, and a chunk runs only when
the debt is paid (a step that carries one pays back its own decode share too). With no request
decoding, chunks of ALONE_TOKENS run back to back (the scheduler may switch to a shorter
prompt between them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

EMA = 0.3  # weight of the newest observation in the moving averages
MIN_SHARE = 256  # the least a prompt token is taken to add to a step: 1/256 of it
ALONE_TOKENS = 512  # a chunk when nothing decodes: big enough to run at full speed, small
# enough that a shorter prompt arriving meanwhile waits for at most one


@dataclass
class ChunkRule:
    slowdown: float = 1.2
    stall: float = 2.0
    step_s: dict[int, float] = field(default_factory=dict)  # batch size -> t_d
    token_s: float | None = None  # c: what one prompt token adds to a decode step
    debt_s: float = 0.0
    chunks_run: int = 0  # steps that carried a chunk, and their prompt tokens (for reports)
    tokens_run: int = 0
    last: int = 0  # the last chunk's tokens: the next is at most twice as many
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.slowdown <= 1.0:
            raise ValueError(f"chunk slowdown must be > 1, got {self.slowdown}")
        if self.stall <= 0:
            raise ValueError(f"chunk stall must be > 0 decode steps, got {self.stall}")

    def decode_s(self, batch: int) -> float | None:
        """t_d for this batch size (the nearest measured one, scaled by size, when unseen)."""
        if batch in self.step_s:
            return self.step_s[batch]
        if not self.step_s:
            return None
        near = min(self.step_s, key=lambda b: abs(b - batch))
        return self.step_s[near] * max(batch, 1) / max(near, 1)

    def tokens(self, decoding: int, left: int) -> int:
        """Tokens of the next chunk for a step with `decoding` requests (0: not this step)."""
        if decoding == 0:
            return min(left, ALONE_TOKENS)
        with self.lock:
            t_d = self.decode_s(decoding)
            if t_d is None or self.debt_s > 0:
                return 0  # measure a decode step first; or the last chunk is not paid for
            if self.token_s is None:
                return min(left, 1)  # one token measures c
            n = int(self.stall * t_d / max(self.token_s, 1e-12))
            # slow start: a chunk at most doubles the last one, so one step measured faster
            # than it was (noise) cannot make the next chunk stall decode for seconds
            return max(1, min(left, n, 2 * max(self.last, 1)))

    def observe_steps(self, decoding: int, seconds: list[float]) -> None:
        """Decode steps of `decoding` requests, without chunks, one after the other (observe's
        chunk-free case; the simulator's blocks of steps): the steps' running average, and the
        debt each pays back."""
        if decoding == 0:
            return
        with self.lock:
            old = self.step_s.get(decoding)
            for s in seconds:
                old = s if old is None else old + EMA * (s - old)
                self.debt_s = max(0.0, self.debt_s - (self.slowdown - 1.0) * s)
            if old is not None:
                self.step_s[decoding] = old

    def observe(self, decoding: int, chunk: int, seconds: float) -> None:
        """A decode step of `decoding` requests that carried `chunk` prompt tokens took
        `seconds`."""
        if decoding == 0:
            return  # a prefill alone: no decode step to compare with
        if chunk == 0:
            self.observe_steps(decoding, [seconds])
            return
        with self.lock:
            self.chunks_run += 1
            self.tokens_run += chunk
            self.last = chunk
            t_d = self.decode_s(decoding)
            base = t_d if t_d is not None else seconds
            extra = max(0.0, seconds - base)
            # a token never costs less than 1/MIN_SHARE of a step: a step that ran faster than
            # the average (noise) must not make the next chunk unbounded
            per = max(extra / chunk, base / MIN_SHARE)
            self.token_s = (
                per if self.token_s is None else self.token_s + EMA * (per - self.token_s)
            )
            # the step's own decode token pays back its share too
            self.debt_s = max(0.0, self.debt_s + extra - (self.slowdown - 1.0) * base)
