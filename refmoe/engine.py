"""The serving engine: schedule, execute, postprocess, on two workers over one model.

    prefill worker   plan = scheduler.next_prefill(); restore the prompt's cached prefix (if
                     the prefix cache holds one), run the rest (CPU kernels or SLP, as the plan
                     says); sample the first token; hand the request (and its cache) to decode
    decode worker    plan = scheduler.next_decode(); one batched step for every running
                     request (each expert's weights read once for the batch), carrying a chunk
                     of a CPU-path prompt when the plan has one (chunked prefill: decode never
                     waits behind a whole prefill); with dual-batch overlap, two micro-batches
                     in two threads alternating attention and experts; sample, stream, finish

The prefix cache (refmoe/prefix_cache.py) keeps every prefilled prompt's cache, and every
finished request's, by token prefix, so an agent's next turn runs only its new tokens; for a
model with linear attention, snapshots of its state at positions marked before the prefill.

Both workers share the one model object, so the one host copy of the weights serves both
(prefill-decode disaggregation inside one process, zero-copy). Requests arrive from any
thread (the HTTP server's) through submit / cancel; every change of their state goes through
one lock; every wait is a sleep on a condition variable.

Events a request's sink receives (from the workers' threads): {"type": "token", "token_ids",
"text"} for each new piece, then {"type": "finish", "reason", "stop_sequence", "usage"} or
{"type": "error", "message", "status"}.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from refmoe import slp
from refmoe.demo import available_memory
from refmoe.dual_batch import DualBatch
from refmoe.models.kv_cache import KVCache
from refmoe.policy import EngineConfig, Policy, fixed_state_tokens
from refmoe.prefix_cache import Hit, PrefixCache
from refmoe.sampling import Sampler, SamplingParams, TokenLogprob, token_logprobs
from refmoe.scheduler import Chunk, DecodePlan, Entry, PrefillPlan, QueueFull
from refmoe.tokenizer import Detokenizer
from refmoe.trace import gauges

if TYPE_CHECKING:
    from refmoe.dslp import Group

__all__ = ["Engine", "QueueFull", "Request", "ShuttingDown"]

log = logging.getLogger("refmoe.engine")

PREFIX_SHARE = 0.1  # of the memory free at start, for the prefix cache by default


class ShuttingDown(Exception):
    """The engine no longer accepts requests."""


MAX_PROMPT_LOGIT_BYTES = 2 << 30  # an echo's logits over its prompt, float32 (its own bound)


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    sink: Callable[[dict], None]  # receives the request's events, from the workers' threads
    stop_ids: set[int] = field(default_factory=set)
    stop_text: list[str] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    out: list[int] = field(default_factory=list)
    cache: KVCache | None = None
    sampler: Sampler | None = None
    text_sent: int = 0  # characters of the decoded output already emitted
    detok: Detokenizer | None = None  # the output's text, decoded as it grows
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    hit: Hit | None = None  # the cached prefix found for it, until restored
    prompt_logprobs: list[TokenLogprob] | None = None  # echo: sent with the first token
    cached: int = 0  # prompt tokens restored from the prefix cache


class Engine:
    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        kv_tokens: int | None = None,
        kv_memory: float | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        prefill: str = "auto",
        dual_batch: bool | str | None = None,
        metrics=None,
        max_context: int | None = None,
        trace=None,
        ranks: int = 1,
        model_dir: str | None = None,
        config: EngineConfig | None = None,
        rates=None,
        prefix_cache_gib: float | None = None,
        chunked_prefill: str | bool = "auto",
        decode_slowdown: float = 1.2,
        chunk_stall: float = 2.0,
    ):
        """The keyword arguments make an EngineConfig (or pass `config`); rates: the cost
        model's (default: measured at start() when prefill is auto)."""
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.trace = trace  # a refmoe.trace.Trace: steps, layers and requests
        if trace is not None:
            model.trace = trace
        self.context = max_context or model.cfg.max_position_embeddings
        if kv_memory is not None:  # a KV budget in bytes: as many tokens as fit
            if kv_tokens is not None:
                raise ValueError("give the KV budget in tokens or in memory, not both")
            per = max(model.kv_bytes_per_token(), 1)  # 1: every layer recurrent (see policy)
            kv_tokens = int(kv_memory // per)
            if kv_tokens < 1:
                raise ValueError(
                    f"a KV memory of {kv_memory:.0f} bytes holds no token "
                    f"({per} bytes each for this model)"
                )
        self.config = config or EngineConfig(
            prefill=prefill,
            dual_batch=dual_batch,
            ranks=ranks,
            kv_tokens=kv_tokens or 4 * self.context,
            max_batch=max_batch,
            max_queue=max_queue,
            chunked_prefill=chunked_prefill,
            prefix_cache_gib=prefix_cache_gib,
            decode_slowdown=decode_slowdown,
            chunk_stall=chunk_stall,
        )
        if self.config.ranks > 1 and model_dir is None:
            raise ValueError(
                "DSLP over several ranks needs the model directory (each rank loads it)"
            )
        self.ranks, self.model_dir = self.config.ranks, model_dir
        self.group: Group | None = None  # the other ranks of DSLP, once started
        # the policy holds the cost model's rates: given, or measured at start() for "auto"
        self.policy = Policy.build(
            self.config,
            model.cfg,
            rates,
            accelerated=model.device.type != "cpu",
            can_stream=slp.streamable(model),
        )
        c = self.config
        gib = c.prefix_cache_gib
        room = int(available_memory() * PREFIX_SHARE if gib is None else gib * 2**30)
        state = getattr(model, "state_bytes", lambda: 0)()  # linear attention's fixed state
        state_tokens = fixed_state_tokens(state, model.kv_bytes_per_token())
        # a model with recurrent layers (linear attention) caches snapshots of their state:
        # a long prompt's about as far apart as the state is large in tokens of KV, so that
        # they take about as much memory as the prefix they follow
        self.recurrent = not model.new_cache().positional
        # DSLP's other ranks prefill into caches of their own: no prefix to restore there
        self.prefix = (
            PrefixCache(room, snapshot_every=max(state_tokens, 1))
            if room > 0 and c.ranks == 1
            else None
        )
        self.chunks = self.policy.chunk_rule  # fed the decode steps' measured times
        self.scheduler = self.policy.scheduler(
            lookup=self._lookup if self.prefix is not None else None,
            state_tokens=state_tokens,
        )
        # a prefix its caches map (on the CPU) is the prefix cache's memory, not theirs
        self.scheduler.shares = self.prefix is not None and torch.device(model.device).type == "cpu"
        if trace is not None:  # what a simulator replaying this run must know
            trace.metadata.setdefault("engine", {})["chunked_prefill"] = self.policy.chunked
        self.requests: dict[str, Request] = {}
        self.lock = threading.Condition()
        self.accepting, self.stopping = True, False
        self.ids = itertools.count()
        self.dual = DualBatch()  # the lock pair and helper thread of dual-batch overlap
        self.workers = [
            threading.Thread(target=self._loop, args=(kind,), daemon=True, name=f"refmoe-{kind}")
            for kind in ("prefill", "decode")
        ]
        self._moe = [b.ffn for b in model.blocks if hasattr(b.ffn, "seconds")]
        self._expert_s = sum(m.seconds for m in self._moe)
        self.steps = {"prefill": 0, "decode": 0}
        self._streamer: slp.StreamPrefill | None = None  # one SLP runner, its ring reused

    # -- the public face ------------------------------------------------------------------

    def start(self) -> Engine:
        if self.config.prefill == "auto" and self.policy.can_stream and self.policy.rates is None:
            self.policy.rates = slp.model_rates(self.model)
        if self.trace is not None and self.policy.rates is not None:
            # the rates "auto" chose each prompt's path by: a replay can choose as it did
            self.trace.metadata.setdefault("engine", {})["rates"] = self.policy.rates.as_dict()
        if self.ranks > 1:  # the other ranks of DSLP: processes that load the model
            from refmoe import dslp

            assert self.model_dir is not None  # checked in __init__
            self.group = dslp.Group.start(self.model, self.model_dir, self.ranks)
        for w in self.workers:
            w.start()
        return self

    def submit(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        params: SamplingParams,
        sink,
        stop_ids=(),
        stop_text=(),
    ) -> Request:
        """Queue a request; raises ValueError (bad request), QueueFull or ShuttingDown."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}), got {bad[:5]}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt_ids) + max_tokens > self.context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the context of {self.context} tokens"
            )
        if stop_text and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        most = MAX_PROMPT_LOGIT_BYTES // (4 * vocab)
        if params.prompt_logprobs is not None and len(prompt_ids) > most:
            raise ValueError(
                f"echo with logprobs keeps every prompt position's logits (4 bytes x "
                f"{vocab:,} each): at most {most:,} prompt tokens, got {len(prompt_ids):,}"
            )
        with self.lock:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            req = Request(
                f"req-{next(self.ids)}",
                list(prompt_ids),
                max_tokens,
                params,
                sink,
                set(stop_ids),
                [s for s in stop_text if s],
            )
            whole = params.prompt_logprobs is not None  # every prompt logit: run whole
            self.scheduler.add(Entry(req.id, len(prompt_ids), max_tokens, req.arrival, whole=whole))
            self.requests[req.id] = req
            self._gauges()
            self.lock.notify_all()
        return req

    def cancel(self, request_id: str) -> None:
        """The client went away. A request no worker holds yet (waiting) leaves at once;
        one being prefilled or decoded is only marked, and the worker that owns its step drops
        it (and frees its KV) at the step's boundary, so no step ever loses a cache under it
        and no other request of the step is touched."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is None:
                return
            req.cancelled = True
            if self.scheduler.state(request_id) == "waiting":
                self._drop(req)
            self.lock.notify_all()

    def shutdown(self, drain_s: float = 10.0) -> None:
        """Stop accepting; let running requests finish for up to drain_s; fail the rest with
        an error event; stop the workers."""
        deadline = time.monotonic() + drain_s
        with self.lock:
            self.accepting = False
            while self.requests and time.monotonic() < deadline:
                self.lock.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            for req in list(self.requests.values()):
                self._fail(
                    req,
                    f"the server shut down before this request finished (it "
                    f"drained for {drain_s:g} s)",
                    status=503,
                )
            self.stopping = True
            self.lock.notify_all()
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=30)
        self.dual.close()
        if self.group is not None:
            self.group.close()
            self.group = None

    @property
    def kv_usage(self) -> float:
        return self.scheduler.kv.usage

    # -- the workers ----------------------------------------------------------------------

    def _loop(self, kind: str) -> None:
        nxt = self.scheduler.next_prefill if kind == "prefill" else self.scheduler.next_decode
        while True:
            with self.lock:
                plan: PrefillPlan | DecodePlan | None = None
                try:
                    while not self.stopping and (plan := nxt()) is None:
                        self.lock.wait(0.5)
                except Exception as e:  # noqa: BLE001 - a planning bug must not kill the worker
                    # (every client would then wait forever): the requests it may have left
                    # half-planned fail with the error, and the worker goes on
                    log.exception("the %s worker's scheduler failed", kind)
                    for req in list(self.requests.values()):
                        if self.scheduler.state(req.id) != "waiting":
                            self._fail(req, f"the scheduler failed: {type(e).__name__}: {e}")
                    continue
                if self.stopping or plan is None:
                    return
                self._gauges()  # waiting -> prefilling changes both gauges
            start = self.trace.now() if self.trace else 0.0
            if isinstance(plan, PrefillPlan):
                ids = [plan.request_id]
                detail = {"requests": 1, "tokens": plan.tokens, "path": plan.where}
            else:
                ids = plan.request_ids + ([plan.chunk.request_id] if plan.chunk else [])
                detail = {"requests": len(ids), "micro_batches": len(plan.micro_batches)}
                if plan.chunk is not None:
                    detail["prefill_chunk_tokens"] = plan.chunk.tokens
            try:
                if isinstance(plan, PrefillPlan):
                    self._prefill(plan)
                else:
                    self._decode(plan)
                if self.trace:
                    self.trace.span(
                        "scheduler",
                        f"{kind} worker",
                        kind,
                        start,
                        self.trace.now() - start,
                        **detail,
                    )
            except Exception as e:  # noqa: BLE001 - one failing step fails its requests only
                with self.lock:
                    for rid in ids:
                        if rid in self.requests:
                            self._fail(self.requests[rid], f"{type(e).__name__}: {e}")
            self.steps[kind] += 1
            self._count_expert_time()

    def _prefill(self, plan: PrefillPlan) -> None:
        with self.lock:
            req = self.requests.get(plan.request_id)
            if req is not None and req.cancelled:  # gone before its prefill began
                self._drop(req)
                return
        if req is None:  # failed or dropped while waiting
            return
        cache = self._fresh_cache(req, plan.cached)
        ids = torch.tensor(req.prompt_ids[plan.cached :])
        k = req.params.prompt_logprobs  # echo: every position's logits (plan.cached is 0)
        if plan.where == "slp" and self.group is not None:
            # every rank (DSLP) when decode has been quiet; else ranks 1..N-1, this process
            # only receiving the cache, so its device stays with decode (the paper's split)
            logits = self.group.prefill(
                ids, cache, all_logits=k is not None, host_only=0 not in plan.device_ids
            )
        elif plan.where == "slp":
            if self._streamer is None:
                self._streamer = slp.StreamPrefill(
                    self.model, chunk_tokens=self.policy.chunk_tokens
                )
            logits = self._streamer.prefill(
                ids, cache, modes=plan.streaming, all_logits=k is not None
            )
        else:
            logits = self.model.forward(ids, cache, logits="last" if k is None else "all")
        if k is not None:  # token t under the logits after t - 1; the first has none
            first = TokenLogprob(req.prompt_ids[0], None, None)
            req.prompt_logprobs = [first, *token_logprobs(logits[:-1], req.prompt_ids[1:], k)]
        self._prefilled(req, cache, logits[-1])

    def _fresh_cache(self, req: Request, cached: int):
        """A new cache for req, holding its cached prefix when the plan restores one."""
        cache = self.model.new_cache()
        if cached and req.hit is not None and self.prefix is not None:
            self.prefix.restore(req.hit, cache, self.model.device)
            req.cached = cached
        req.hit = None  # restored (or not needed): its blocks may go
        if self.recurrent and self.prefix is not None:  # where its state is snapshotted
            cache.mark(self.prefix.marks(len(req.prompt_ids), cache.length))
        return cache

    def _prefilled(self, req: Request, cache, last_logits: torch.Tensor) -> None:
        """The prompt is in the cache: keep its blocks, sample the first token, decode."""
        if self.prefix is not None:
            self.prefix.store(req.prompt_ids, cache)
        sampler = Sampler(req.params)
        token = sampler(last_logits)
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(req.prompt_ids) - req.cached)
        with self.lock:
            if req.cancelled or req.finish_reason is not None:  # the step's boundary
                self._drop(req)
                return
            req.cache, req.sampler = cache, sampler
            self._emit(req, [token])
            if req.cancelled:  # hung up on its first token (or its sink broke)
                self._drop(req)
            elif req.finish_reason is None:
                self.scheduler.prefilled(req.id)
                self._gauges()
            self.lock.notify_all()

    def _decode(self, plan: DecodePlan) -> None:
        # The step's boundary: requests cancelled since the last step leave here, before any
        # work; the caches of the rest are taken now, so the step owns what it reads.
        with self.lock:
            batches = []
            for mb in plan.micro_batches:
                seqs = []
                for rid in mb:
                    req = self.requests.get(rid)
                    if req is None:
                        continue
                    if req.cancelled:
                        self._drop(req)
                    else:
                        seqs.append((req, req.cache, torch.tensor(req.out[-1:])))
                batches.append(seqs)
            chunk = self._chunk_seq(plan.chunk)
        decoders = sum(len(b) for b in batches)
        if chunk is not None:  # the prompt's chunk rides along the first micro-batch
            batches[0].append(chunk)
        batches = [b for b in batches if b]
        if not batches:
            return

        def step(seqs, locks) -> torch.Tensor:
            return self.model.forward_batch([i for _, _, i in seqs], [c for _, c, _ in seqs], locks)

        t0 = time.perf_counter()
        results = self.dual.run(step, batches)  # two micro-batches: overlapped
        n = 0 if chunk is None else int(chunk[2].shape[0])
        self.chunks.observe(decoders, n, time.perf_counter() - t0)
        if chunk is not None and plan.chunk is not None:
            creq, ccache = chunk[0], chunk[1]
            with self.lock:
                self.scheduler.chunked(creq.id, n)
                gone = creq.cancelled or creq.finish_reason is not None
                if gone:
                    self._drop(creq)
                self.lock.notify_all()
            if plan.chunk.last and not gone:
                creq.cache = None  # _prefilled hands it back with the sampler
                self._prefilled(creq, ccache, results[0][-1])
        with self.lock:  # the step's other boundary
            for seqs, logits in zip(batches, results):
                for (req, _, _), row in zip(seqs, logits):
                    if chunk is not None and req is chunk[0]:
                        continue
                    if req.finish_reason is not None:
                        continue
                    if req.cancelled or req.sampler is None:
                        self._drop(req)
                    else:
                        self._emit(req, [req.sampler(row)])
            self.lock.notify_all()

    def _chunk_seq(self, chunk: Chunk | None):
        """(request, its cache, the chunk's token ids) for a plan's prefill chunk (lock held);
        None when there is none or its request has gone. The cache starts at the first chunk,
        with the prompt's cached prefix restored."""
        if chunk is None:
            return None
        req = self.requests.get(chunk.request_id)
        if req is None:
            return None
        if req.cancelled:
            self._drop(req)
            return None
        if req.cache is None:
            req.cache = self._fresh_cache(req, chunk.start)
        ids = torch.tensor(req.prompt_ids[chunk.start : chunk.start + chunk.tokens])
        return req, req.cache, ids

    # -- postprocess (called with the lock held) -------------------------------------------

    def _emit(self, req: Request, tokens: list[int]) -> None:
        now = time.monotonic()
        m = self.metrics
        for t in tokens:
            req.out.append(t)
            if req.first_token_at is None:
                req.first_token_at = now
                if m:
                    m.ttft.observe(now - req.arrival)
            elif m and req.last_token_at is not None:
                m.itl.observe(now - req.last_token_at)
            req.last_token_at = now
        if m:
            m.generation_tokens.inc(len(tokens))
        reason = None
        if req.out[-1] in req.stop_ids or (req.sampler is not None and req.sampler.finished):
            reason = "stop"
        elif len(req.out) >= req.max_tokens:
            reason = "length"
        text, matched = "", None
        if self.tokenizer is not None:
            # the text of whole characters so far (a character whose UTF-8 bytes come over
            # several tokens waits for the last: byte-level tokens split CJK and emoji), decoded
            # incrementally; at the end every token's
            if req.detok is None:
                req.detok = Detokenizer(self.tokenizer)
            req.detok.add(tokens)
            full = req.detok.full() if reason else req.detok.text
            for s in req.stop_text:  # a match can only begin in what has not been sent
                at = full.find(s, req.text_sent)
                if at >= 0:
                    full, reason, matched = full[:at], "stop", s
            # hold back what could be the start of a stop string until it is decided
            hold = 0 if reason else max((len(s) - 1 for s in req.stop_text), default=0)
            upto = max(req.text_sent, len(full) - hold)
            text, req.text_sent = full[req.text_sent : upto], upto
        event = {"type": "token", "token_ids": tokens, "text": text}
        if req.params.logprobs is not None and req.sampler is not None:
            event["logprobs"] = req.sampler.take_logprobs()
        if req.prompt_logprobs is not None:  # with the first token
            event["prompt_logprobs"], req.prompt_logprobs = req.prompt_logprobs, None
        self._send(req, event)
        if reason:  # dropped first: a client told "finish" sees its KV freed
            req.finish_reason = reason
            self._drop(req)
            if m:
                m.e2e.observe(now - req.arrival)
            self._send(
                req,
                {
                    "type": "finish",
                    "reason": reason,
                    "stop_sequence": matched,  # the stop string that ended it, if one did
                    "usage": self._usage(req),
                },
            )

    def _fail(self, req: Request, message: str, status: int = 500) -> None:
        """status: the HTTP status a server should answer with (503: shutting down)."""
        req.finish_reason = "error"
        self._drop(req)
        self._send(req, {"type": "error", "message": message, "status": status})

    def _drop(self, req: Request) -> None:
        if self.trace is not None and req.id in self.requests:
            t0 = time.monotonic() - self.trace.now()  # the trace's start, on this clock
            self.trace.request(
                id=req.id,
                arrival=req.arrival - t0,
                prompt_tokens=len(req.prompt_ids),
                output_tokens=len(req.out),
                finish_reason=req.finish_reason,
                first_token_time=None if req.first_token_at is None else req.first_token_at - t0,
                finish_time=time.monotonic() - t0,
            )
        if req.finish_reason in ("stop", "length") and req.cache is not None and self.prefix:
            # the whole conversation so far, for its next turn (new blocks only are copied)
            self.prefix.store(req.prompt_ids + req.out, req.cache, now=True)
        self.requests.pop(req.id, None)
        req.cache = None
        self.scheduler.finish(req.id)
        self._gauges()

    def _lookup(self, request_id: str) -> tuple[int, int]:
        """The scheduler asks (lock held) how much of a request's prompt is cached, and how
        much of that its cache will map rather than copy; the hit is kept on the request
        until its prefill restores it."""
        req = self.requests.get(request_id)
        if req is None or self.prefix is None:
            return 0, 0
        req.hit = self.prefix.match(req.prompt_ids, recurrent=self.recurrent)
        if self.metrics:
            self.metrics.prefix_queries.inc(len(req.prompt_ids))
            self.metrics.prefix_hits.inc(req.hit.tokens)
        return req.hit.tokens, self.prefix.shared_tokens(req.hit, self.model.device)

    def _send(self, req: Request, event: dict) -> None:
        try:
            req.sink(event)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the engine
            req.cancelled = True  # its worker drops it at the next step boundary

    @staticmethod
    def _usage(req: Request) -> dict:
        return {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.out),
            "total_tokens": len(req.prompt_ids) + len(req.out),
            "prompt_tokens_details": {"cached_tokens": req.cached},
        }

    def _gauges(self) -> None:
        """On every state change: the Prometheus gauges, and the trace's counter tracks."""
        s = self.scheduler
        if self.metrics:
            self.metrics.waiting.set(s.queue_depth)
            self.metrics.running.set(s.running)
            self.metrics.kv_usage.set(s.kv.usage)
            if self.prefix is not None:
                self.metrics.prefix_bytes.set(self.prefix.nbytes)
                self.metrics.prefix_hit_rate.set(self.prefix.stats.hit_rate)
        if self.trace is not None:
            gauges(self.trace, self.trace.now(), s)

    def _count_expert_time(self) -> None:
        with self.lock:
            total = sum(m.seconds for m in self._moe)
            if self.metrics and total > self._expert_s:
                self.metrics.expert_seconds.inc(total - self._expert_s)
            self._expert_s = total
