"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): grouped-query attention with per-head q/k
RMSNorm, rotate-half rope, softmax top-k routing (norm_topk_prob), no shared expert.

The router, MoE block, MLP, norms and loading are shared (layers.py); here: the attention with
its KV cache, the Transformer, a smoke run. Legend: T = tokens in this call, S = tokens in the
cache, n = query heads, g = key/value heads, d = head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.models.decoder import Block, DecoderModel
from refmoe.models.kv_cache import Growing
from refmoe.models.layers import (
    Linear,
    apply_rope,
    attend,
    load_dense,
    rms_norm,
)


@dataclass(slots=True)
class LayerCache:
    """Per layer: keys (roped) and values, [g, S, d] each."""

    k: Growing = field(default_factory=lambda: Growing(1))
    v: Growing = field(default_factory=lambda: Growing(1))

    @property
    def length(self) -> int:
        return self.k.n


class GQA:
    new_cache = LayerCache

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig):
        h, n, g, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg, self.n, self.g, self.d = cfg, n, g, d
        self.q = Linear(ck, f"{p}.q_proj.weight", (n * d, h))
        self.k = Linear(ck, f"{p}.k_proj.weight", (g * d, h))
        self.v = Linear(ck, f"{p}.v_proj.weight", (g * d, h))
        self.o = Linear(ck, f"{p}.o_proj.weight", (h, n * d))
        self.q_norm = load_dense(ck, f"{p}.q_norm.weight", (d,))
        self.k_norm = load_dense(ck, f"{p}.k_norm.weight", (d,))

    def cache_bytes_per_token(self) -> int:
        """What one token adds to this layer's cache: its keys and values, float32."""
        return 2 * 4 * self.g * self.d

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        softmax_scale: float,
        cache: LayerCache,
        cp=None,
    ) -> torch.Tensor:
        """x [T, H] at positions cache.length .. +T; returns [T, H] and extends the cache.
        cp (context parallel): x is this rank's slice; every rank's keys and values are
        gathered into the cache and the queries sit at cp.offset."""
        return self.batch([x], [(cos, sin)], softmax_scale, [cache], cp)[0]

    def batch(
        self, xs: list[torch.Tensor], ropes, softmax_scale: float, caches: list[LayerCache], cp=None
    ) -> list[torch.Tensor]:
        """Several sequences: q/k/v/o projections once over all their tokens; norms, rope, the
        cache and the attention proper per sequence."""
        sizes = [x.shape[0] for x in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [T, H]
        q, k, v = self.q(x), self.k(x), self.v(x)
        outs = [
            self._attend(qi, ki, vi, cos, sin, softmax_scale, cache, cp)
            for qi, ki, vi, (cos, sin), cache in zip(
                q.split(sizes), k.split(sizes), v.split(sizes), ropes, caches
            )
        ]
        out = self.o(outs[0] if len(outs) == 1 else torch.cat(outs))  # [T, H]
        return list(out.split(sizes))

    def _attend(self, q, k, v, cos, sin, softmax_scale, cache: LayerCache, cp) -> torch.Tensor:
        """One sequence: q [T, n*d], k and v [T, g*d] -> [T, n*d]."""
        eps, t, n, g, d = self.cfg.rms_norm_eps, q.shape[0], self.n, self.g, self.d
        q = rms_norm(q.view(t, n, d), self.q_norm, eps).transpose(0, 1)  # [n, T, d]
        k = rms_norm(k.view(t, g, d), self.k_norm, eps).transpose(0, 1)  # [g, T, d]
        v = v.view(t, g, d).transpose(0, 1)  # [g, T, d]
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        start = cache.length
        if cp is not None:
            k, v, start = cp.gather(k, dim=1), cp.gather(v, dim=1), start + cp.offset
        kk = cache.k.append(k).repeat_interleave(n // g, dim=0)  # [n, S, d]
        vv = cache.v.append(v).repeat_interleave(n // g, dim=0)
        out = attend(q, kk, vv, start, d**-0.5 * softmax_scale)  # [n, T, d]
        return out.transpose(0, 1).reshape(t, n * d)


class Transformer(DecoderModel):
    """The whole Qwen3-MoE model (see DecoderModel.forward)."""

    def __init__(self, ck: Checkpoint, cfg: ModelConfig, *args, **kwargs):
        self.rope_dim = cfg.head_dim
        super().__init__(ck, cfg, *args, **kwargs)

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads) -> Block:
        return Block(
            ck,
            layer,
            cfg,
            GQA(ck, f"model.layers.{layer}.self_attn", cfg),
            expert_dtype,
            num_threads,
        )


if __name__ == "__main__":  # smoke run: python -m refmoe.models.qwen3_moe MODEL_DIR
    import sys

    cfg = ModelConfig.from_file(sys.argv[1])
    model = Transformer(Checkpoint(sys.argv[1]), cfg)
    logits = model.forward(torch.tensor([1, 2, 3]), model.new_cache())
    print(logits.shape, logits[-1].topk(5))
