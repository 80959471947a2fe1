"""The one policy seam: an EngineConfig and the Policy built from it for a machine.

The engine, `refmoe generate` and the simulator each build their policy here and nowhere
else, so they cannot disagree: which path a prompt's prefill takes (the cost model over the
machine's rates: measured for the engine, read off a hardware profile for the simulator),
whether dual-batch overlap is on, how many devices and which ones a prefill takes, how many
SLP chunks it runs and whether each streams selectively. The scheduler (refmoe/scheduler.py)
asks the policy and puts all of it in the plan; executors only carry plans out.
"""

from __future__ import annotations

from dataclasses import dataclass

from refmoe import costmodel
from refmoe.chunking import ChunkRule
from refmoe.config import ModelConfig
from refmoe.scheduler import Scheduler

PREFILL = ("auto", "cpu", "slp")
DUAL_BATCH = ("auto", "on", "off")


@dataclass(slots=True)
class EngineConfig:
    """What a user sets (`refmoe serve` flags; the simulator's serve options), validated."""

    prefill: str = "auto"  # auto (the cost model decides per prompt), cpu, slp
    # auto: on where attention runs on an accelerator; on, off (None/True/False: the same, as
    # the engine's keyword spelled it; stored as auto/on/off)
    dual_batch: str | bool | None = "auto"
    ranks: int = 1  # SLP devices; with more than one a prefill may use DSLP
    kv_tokens: int | None = None  # KV budget in tokens (None: 4 contexts)
    max_batch: int = 16  # requests per decode step
    max_queue: int = 256  # waiting requests before QueueFull (HTTP 429)
    decode_quiet_s: float = 300.0  # DSLP takes every device only after this long without decode
    chunk_tokens: int | None = None  # SLP chunk length (None: the device's default)
    # chunked CPU prefill: while others decode, a CPU-path prompt rides along decode steps
    # (refmoe/chunking.py) so that their mean time per token grows by at most decode_slowdown
    # and one step by at most chunk_stall steps; off: it runs whole beside them. auto: on
    # where nothing but the CPU runs the model; with a GPU the paper's split stays (long
    # prompts stream to the device while the CPU decodes; short ones run whole)
    chunked_prefill: str | bool = "auto"
    decode_slowdown: float = 1.2
    chunk_stall: float = 2.0
    # host memory for the prefix cache, GiB (None: a share of the memory free at start; 0: off)
    prefix_cache_gib: float | None = None

    def __post_init__(self):
        if self.prefill not in PREFILL:
            raise ValueError(f"prefill must be auto, cpu or slp, got {self.prefill!r}")
        if self.dual_batch in (None, True, False):  # the engine's older spelling
            self.dual_batch = {None: "auto", True: "on", False: "off"}[self.dual_batch]
        if self.dual_batch not in DUAL_BATCH:
            raise ValueError(f"dual_batch must be auto, on or off, got {self.dual_batch!r}")
        if self.chunked_prefill in (True, False):
            self.chunked_prefill = "on" if self.chunked_prefill else "off"
        if self.chunked_prefill not in DUAL_BATCH:
            raise ValueError(
                f"chunked_prefill must be auto, on or off, got {self.chunked_prefill!r}"
            )
        for name in ("ranks", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kv_tokens", "chunk_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.decode_quiet_s < 0:
            raise ValueError(f"decode_quiet_s must be >= 0, got {self.decode_quiet_s}")
        if self.decode_slowdown <= 1.0:
            raise ValueError(f"decode_slowdown must be > 1, got {self.decode_slowdown}")
        if self.chunk_stall <= 0:
            raise ValueError(f"chunk_stall must be > 0 decode steps, got {self.chunk_stall}")
        if self.prefix_cache_gib is not None and self.prefix_cache_gib < 0:
            raise ValueError(f"prefix_cache_gib must be >= 0, got {self.prefix_cache_gib}")


class Policy:
    """EngineConfig applied to one model on one machine. Build it with Policy.build."""

    def __init__(
        self,
        config: EngineConfig,
        cfg: ModelConfig,
        rates: costmodel.Rates | None,
        accelerated: bool,
        can_stream: bool,
        chunk_tokens: int,
    ):
        self.config, self.cfg, self.rates = config, cfg, rates
        self.accelerated, self.can_stream = accelerated, can_stream
        self.chunk_tokens = config.chunk_tokens or chunk_tokens
        # chunked CPU prefill: sized from step times the executor reports (observe), measured
        # by the engine, simulated by the simulator
        self.chunk_rule = ChunkRule(config.decode_slowdown, config.chunk_stall)

    @classmethod
    def build(
        cls,
        config: EngineConfig,
        cfg: ModelConfig,
        rates: costmodel.Rates | None,
        *,
        accelerated: bool,
        can_stream: bool = True,
    ) -> Policy:
        """accelerated: attention runs on a GPU (the engine: the model's device is CUDA; the
        simulator: the profile has GPUs). can_stream: SLP can run this model here (its experts
        are FP8 or BF16, and for the simulator there is a GPU to stream to). rates: the cost
        model's, needed only for prefill "auto" (None: the CPU path)."""
        chunk = costmodel.SLP_CHUNK_TOKENS["cuda" if accelerated else "cpu"]
        return cls(config, cfg, rates, accelerated, can_stream, chunk)

    @property
    def chunked(self) -> bool:
        """Chunked CPU prefill: on, or auto where the model runs on the CPU alone."""
        c = self.config.chunked_prefill
        return c == "on" or (c == "auto" and not self.accelerated)

    @property
    def dual_batch(self) -> bool:
        d = self.config.dual_batch
        # auto: overlap pays when attention and experts run on different hardware; on a
        # CPU-only machine both halves would compete for the same cores
        return d == "on" or (d == "auto" and self.accelerated)

    def path(self, tokens: int, busy: bool = False, wait_s: float = 0.0) -> str:
        """ "cpu" or "slp" for a prompt of `tokens` tokens; busy: requests are decoding, so
        with chunked prefill a CPU prefill gets only (slowdown - 1) / slowdown of the CPU;
        wait_s: how long the prefill worker stays busy with another prompt, which SLP would
        wait out and a chunked CPU prefill (on the decode worker) would not."""
        if not self.can_stream:
            return "cpu"
        if self.config.prefill != "auto":
            return self.config.prefill
        if self.rates is None:
            return "cpu"
        c = self.config
        share = (c.decode_slowdown - 1) / c.decode_slowdown if busy and self.chunked else 1.0
        wait = wait_s if self.chunked else 0.0  # unchunked, both paths wait for the worker
        return costmodel.choose_prefill(
            self.cfg, tokens, self.rates, self.chunk_tokens, cpu_share=share, slp_wait_s=wait
        ).path

    def seconds(self, tokens: int, where: str) -> float:
        """The cost model's estimate of a prefill's experts on `where` ("cpu" or "slp" on one
        device), what the scheduler scales by measured prefills to tell how long the prefill
        worker stays busy; without rates, the tokens (a rate per token)."""
        if self.rates is None:
            return float(tokens)
        if where == "slp":
            return costmodel.slp_expert_seconds(self.cfg, tokens, self.rates, 1, self.chunk_tokens)
        return costmodel.cpu_expert_seconds(self.cfg, tokens, self.rates)

    def details(self, tokens: int, where: str) -> tuple[int, tuple[str, ...]]:
        """(chunks, streaming mode of each chunk) of a prefill: one chunk and no streaming on
        the CPU path; on SLP, chunks of chunk_tokens, each streaming every expert ("prefetch")
        or only the routed ones ("selective") by costmodel.streaming."""
        if where != "slp":
            return 1, ()
        c = self.chunk_tokens
        sizes = [min(c, tokens - lo) for lo in range(0, tokens, c)]
        return len(sizes), tuple(costmodel.streaming(self.cfg, t) for t in sizes)

    def scheduler(self, clock=None, lookup=None, state_tokens: int = 0) -> Scheduler:
        """The scheduler this policy drives; its plans carry every decision above (chunks of
        CPU prefills sized by chunk_rule when chunked_prefill is on). lookup: request id ->
        cached prefix tokens (the executor's prefix cache); state_tokens: the fixed state a
        sequence keeps, in tokens of the KV budget (see fixed_state_tokens)."""
        c = self.config
        kv = c.kv_tokens or 4 * self.cfg.max_position_embeddings
        return Scheduler(
            kv,
            c.max_batch,
            c.max_queue,
            self.path,
            self.dual_batch,
            devices=c.ranks,
            decode_quiet_s=c.decode_quiet_s,
            clock=clock,
            details=self.details,
            lookup=lookup,
            chunk_tokens=self.chunk_rule.tokens if self.chunked else None,
            state_tokens=state_tokens,
            estimate=self.seconds,
        )


def fixed_state_tokens(state_bytes: int, bytes_per_token: int) -> int:
    """A sequence's fixed state (linear attention's recurrent state and convolution inputs,
    whatever its length) as tokens of the KV budget: the tokens whose cache takes as much
    memory, rounded up. A model whose every layer is recurrent has no per-token cache: its
    budget counts one token per byte of state."""
    if state_bytes <= 0:
        return 0
    return -(-state_bytes // bytes_per_token) if bytes_per_token > 0 else state_bytes
