"""Next-token choice from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from refmoe.structured import Constraint


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    constraint: Constraint | None = None  # a grammar the reply is held to (refmoe.structured)
    logprobs: int | None = None  # None: none; k: each chosen token's and the k likeliest
    prompt_logprobs: int | None = None  # the same for each prompt token (echo)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature <= 100):
            raise ValueError(f"temperature must lie in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must lie in [0, {MAX_LOGPROBS}], got {k}")


MAX_LOGPROBS = 20  # the most alternatives per token (OpenAI's top_logprobs limit)


@dataclass(slots=True)
class TokenLogprob:
    """A chosen token's log-probability under the model (log-softmax of its raw logits: before
    temperature, top-k / top-p and any grammar, as vLLM reports them by default), and the
    likeliest tokens' (id, log-probability), best first."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing before it)
    top: list[tuple[int, float]] | None


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """TokenLogprobs of tokens[i] under logits[i] ([len(tokens), V]), k alternatives each."""
    lp = torch.log_softmax(logits.float().cpu(), -1)
    chosen = lp.gather(1, torch.tensor(tokens).unsqueeze(1))[:, 0].tolist()
    if k:
        values, ids = torch.topk(lp, min(k, lp.shape[1]))
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        self.logprobs: list[TokenLogprob] = []  # the choices' since last taken (take_logprobs)

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the tokens chosen since the last call (params.logprobs)."""
        out, self.logprobs = self.logprobs, []
        return out

    @property
    def finished(self) -> bool:
        """The reply's grammar is complete: nothing more may follow."""
        c = self.params.constraint
        return c is not None and c.finished

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] -> token id (one the constraint allows, and consumed by it)."""
        c = self.params.constraint
        if c is None:
            token = self._choose(logits)
        else:
            token = self._choose(c.mask(logits.float().cpu()))
            c.accept(token)
        k = self.params.logprobs
        if k is not None:
            self.logprobs += token_logprobs(logits.reshape(1, -1), [token], k)
        return token

    def _choose(self, logits: torch.Tensor) -> int:
        """Greedy, or one draw from the distribution temperature, top-k and top-p leave: the
        candidates found by partial selection (topk), never a sort of the whole vocabulary,
        and one uniform number inverted through their cumulative probabilities (a sort and
        torch.multinomial over 129K ids took 27 ms a token on this 2-core VM)."""
        p, logits = self.params, logits.float().cpu()
        if p.temperature == 0:
            return int(torch.argmax(logits))
        # the best logit at 0 first, in float64: a tiny temperature then sends the rest to
        # -inf, where float32 would make it 0 and the best logit NaN
        z = (logits.double() - logits.max()) / p.temperature
        ids = None  # the candidates' token ids (None: every token, in order)
        if p.top_k and p.top_k < z.numel():
            z, ids = torch.topk(z, p.top_k)  # best first
        probs = torch.softmax(z, -1)
        if p.top_p < 1:
            if ids is None:  # the best first, as many as hold top_p: the 64, 512, ... best
                k = min(64, probs.numel())
                while True:
                    head, ids = torch.topk(probs, k)
                    if k == probs.numel() or float(head.sum()) >= p.top_p:
                        break
                    k = min(probs.numel(), 8 * k)
                probs = head
            keep = probs.cumsum(0) - probs <= p.top_p  # the smallest prefix holding top_p
            probs, ids = probs[keep], ids[keep]
        cdf = probs.cumsum(0)
        u = torch.rand(1, generator=self.generator, dtype=torch.float64) * cdf[-1]
        i = int(torch.searchsorted(cdf, u, right=True))  # cdf[i] > u, so probs[i] > 0
        if i >= cdf.numel():  # u rounded up to the total: the last token that has mass
            i = int(torch.nonzero(probs)[-1])
        return int(ids[i]) if ids is not None else i
