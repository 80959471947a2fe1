"""One request, start to finish: prefill the prompt, then decode token by token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from refmoe.sampling import Sampler, SamplingParams
from refmoe.tokenizer import Detokenizer
from refmoe.trace import maybe


@dataclass(slots=True)
class Generation:
    token_ids: list[int]
    finish_reason: str  # "length" or "stop"
    ttft_s: float  # prompt in to first generated token
    decode_s: float  # the rest
    prompt_tokens: int
    step_s: list[float] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def generate(
    model,
    prompt_ids: list[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: list[int] | None = None,
    max_context: int | None = None,
    trace=None,
    stop_text: list[str] | None = None,
    tokenizer=None,
    prefill=None,
) -> Generation:
    """Greedy or sampled continuation of prompt_ids; stops at max_tokens, a stop id, the end of
    the params' grammar, or (with the refmoe.tokenizer.Tokenizer to decode it) once the text
    contains one of stop_text.
    trace: a refmoe.trace.Trace that gets the prefill and decode spans and the request.
    prefill: a refmoe.slp.StreamPrefill or refmoe.dslp group to run the prompt through (SLP,
    DSLP; anything with prefill(ids, cache, all_logits=False)), or None for the plain path
    (routed experts on the CPU kernels)."""
    if stop_text and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    vocab = model.cfg.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}), got {bad[:5]}")
    limit = max_context or model.cfg.max_position_embeddings
    if len(prompt_ids) + max_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
            f"the context of {limit} tokens"
        )
    sampler = Sampler(params or SamplingParams())
    stop = set(stop_ids or [])
    cache = model.new_cache()
    model.trace = trace
    arrival = trace.now() if trace else 0.0
    t0 = time.perf_counter()
    with maybe(
        trace,
        "scheduler",
        "steps",
        "prefill",
        tokens=len(prompt_ids),
        path="slp" if prefill is not None else "cpu",
    ):
        if prefill is not None:
            prefill.trace = trace
            logits = prefill.prefill(torch.tensor(prompt_ids), cache, all_logits=False)
        else:
            logits = model.forward(torch.tensor(prompt_ids), cache, logits="last")
        out = [sampler(logits[-1])]
    t1 = time.perf_counter()
    first = trace.now() if trace else 0.0
    steps = []
    text = Detokenizer(tokenizer) if stop_text else None  # decoded as it grows

    def stopped() -> bool:
        if out[-1] in stop or sampler.finished:  # a stop id, or the grammar complete
            return True
        if text is None:
            return False
        text.add(out[-1:])
        return any(s in text.text for s in stop_text or ())

    reason = "stop" if stopped() else "length"
    while reason == "length" and len(out) < max_tokens:
        s = time.perf_counter()
        with maybe(trace, "scheduler", "steps", "decode", position=cache.length):
            logits = model.forward(torch.tensor(out[-1:]), cache)
            out.append(sampler(logits[-1]))
        steps.append(time.perf_counter() - s)
        if stopped():
            reason = "stop"
    model.trace = None
    if trace:
        trace.request(
            arrival=arrival,
            prompt_tokens=len(prompt_ids),
            output_tokens=len(out),
            first_token_time=first,
            finish_time=trace.now(),
        )
    return Generation(out, reason, t1 - t0, time.perf_counter() - t1, len(prompt_ids), steps)
