"""Perplexity, and divergence from a reference build: the check a converted checkpoint or a new
kernel passes before it is trusted (llama.cpp's llama-perplexity and its --kl-divergence).

    windows     the text's tokens in windows of `context` tokens that start `stride` apart
                (stride = context: back to back); a token is scored once, by the first window
                that has it with a token before it (Hugging Face's strided evaluation): back
                to back, each window's first token goes unscored; with a smaller stride every
                token is scored, with at least context - stride tokens before it
    perplexity  exp(mean over scored tokens of -log p(token | the window's tokens before it)),
                the log-softmax taken in float64 over the model's float32 logits
    reference   the same windows through another model (the checkpoint as stored against its
                conversion, or another build): mean KL(reference || model) per scored token,
                and how often the two agree on the likeliest next token

Each window runs a prompt path into a fresh cache: the model's own (`model.forward(...,
logits="all")`: attention and dense layers on the model's device, routed experts on the CPU
kernels), or SLP (`prefill=refmoe.slp.StreamPrefill(model)`: the experts streamed to the
device), which on a GPU box is what makes windows of a big model affordable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Score:
    tokens: int = 0  # scored
    windows: int = 0
    nll: float = 0.0  # sum of -log p over the scored tokens
    kld: float = 0.0  # sum of KL(reference || model) (with a reference)
    agree: int = 0  # scored tokens whose likeliest next token both models agree on
    seconds: float = 0.0
    reference: bool = False

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def as_dict(self) -> dict:
        out = {
            "tokens": self.tokens,
            "windows": self.windows,
            "mean_nll": self.nll / self.tokens if self.tokens else float("nan"),
            "ppl": self.ppl,
            "seconds": self.seconds,
        }
        if self.reference and self.tokens:
            out["mean_kld"] = self.kld / self.tokens
            out["top1_agreement"] = self.agree / self.tokens
        return out


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over n tokens."""
    if context < 2:
        raise ValueError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"--stride must lie in [1, context = {context}], got {stride}")
    out, scored = [], 1  # token 0 has nothing before it
    for start in range(0, max(n - 1, 0), stride):
        end = min(start + context, n)
        if end > scored:
            out.append((start, end, max(scored, start + 1)))
            scored = end
        if end == n:
            break
    return out


def log_probs(model, ids: list[int], prefill=None) -> torch.Tensor:
    """[len(ids), V] float64: the log-softmax after each token of one window (prefill: a
    StreamPrefill of the model to run it through, or None for the model's own path)."""
    cache = model.new_cache()
    with torch.no_grad():
        if prefill is None:
            logits = model.forward(torch.tensor(ids), cache, logits="all")
        else:
            logits = prefill.prefill(torch.tensor(ids), cache, all_logits=True)
    return torch.log_softmax(logits.double().cpu(), -1)


def score(
    model,
    ids: list[int],
    context: int,
    stride: int | None = None,
    reference=None,
    progress: Callable[[Iterable], Iterable] | None = None,
    prefill=None,
    reference_prefill=None,
) -> Score:
    """The perplexity of `model` over `ids` (and, with a reference model, its divergence from
    it) in windows (see the module's docstring); prefill, reference_prefill: StreamPrefill
    runners of the two models (SLP), or None for their own paths."""
    vocab = model.cfg.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids must lie in [0, {vocab}), got {bad[:5]}")
    if reference is not None and reference.cfg.vocab_size != vocab:
        raise ValueError(
            f"the reference's vocabulary ({reference.cfg.vocab_size}) is not the model's ({vocab})"
        )
    plan = windows(len(ids), context, stride or context)
    if not plan:
        raise ValueError(f"{len(ids)} tokens: nothing to score (at least 2 are needed)")
    s, t0 = Score(reference=reference is not None), time.perf_counter()
    for start, end, first in progress(plan) if progress else plan:
        window = ids[start:end]
        rows = slice(first - start - 1, end - start - 1)  # the rows that predict ids[first:end]
        target = torch.tensor(ids[first:end]).unsqueeze(1)
        lp = log_probs(model, window, prefill)[rows]
        s.nll -= float(lp.gather(1, target).sum())
        if reference is not None:
            ref = log_probs(reference, window, reference_prefill)[rows]
            s.kld += float((ref.exp() * (ref - lp)).sum())
            s.agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        s.tokens += end - first
        s.windows += 1
    s.seconds = time.perf_counter() - t0
    return s
