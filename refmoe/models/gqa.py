"""Grouped-query attention as the GQA families write it (Qwen3-MoE, GLM-4.5, MiniMax-M2,
gpt-oss), one class whose options come from the config: q/k RMSNorm per head (Qwen3, GLM with
use_qk_norm) or over all heads at once (MiniMax-M2), rope on the first rotary_dim dims of each
head (partial rotary: GLM, MiniMax), q/k/v and o biases (GLM, gpt-oss), learned sinks and
sliding-window layers (gpt-oss). A full layer's cache keeps every position's keys and values;
a sliding layer's keeps its last `window` positions only (WindowCache), a fixed size per
sequence like a linear-attention layer's state, and snapshotted for the prefix cache as one.

Legend: T = tokens in this call, S = tokens in the cache, n = query heads, g = key/value heads,
d = head_dim, r = rotary dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.models.decoder import Block, DecoderModel
from refmoe.models.experts import DEEPSEEK
from refmoe.models.kv_cache import Growing, Snapshotted
from refmoe.models.layers import (
    Linear,
    apply_rope,
    attend,
    load_dense,
    load_norm,
    project,
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


@dataclass(slots=True)
class WindowCache(Snapshotted):
    """A sliding-window layer: the keys (roped) and values of its last `keep` positions,
    [g, <= keep, d] each. A query at position p reads keys p - window + 1 .. p only, so nothing
    older is kept; snapshotted for the prefix cache as a linear-attention state is
    (Snapshotted)."""

    PARTS = ("k", "v")
    keep: int = 0
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def set(self, n: int, *parts: torch.Tensor) -> None:
        held = parts[0].shape[1] if parts else 0
        if held > self.keep or held > n:
            raise ValueError(f"a window of {held} positions after {n} tokens")
        Snapshotted.set(self, n, *parts)

    def attend_and_append(self, k: torch.Tensor, v: torch.Tensor):
        """The keys and values this call attends over ([g, held + T, d]: the window, then k and
        v [g, T, d] of positions n .. n + T), the position of the first of them; then keep the
        last `keep` and the windows the marks in (n, n + T] ask for."""
        kk, vv, held = k, v, 0
        if self.k is not None and self.v is not None:
            held = self.k.shape[1]
            kk, vv = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        first, t = self.n - held, k.shape[1]
        for m in self.marks:
            if self.n < m <= self.n + t:
                lo = max(0, m - self.keep - first)
                self.snaps[m] = (kk[:, lo : m - first].clone(), vv[:, lo : m - first].clone())
        cut = max(0, kk.shape[1] - self.keep)
        self.k, self.v = kk[:, cut:].contiguous(), vv[:, cut:].contiguous()
        self.n += t
        return kk, vv, first


class GQA:
    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig, layer: int = 0):
        h, n, g, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg, self.n, self.g, self.d, self.r = cfg, n, g, d, cfg.rotary_dim
        gate = 2 if cfg.attention_output_gate else 1  # Qwen3-Next: each head's gate beside it
        self.q = Linear(ck, f"{p}.q_proj.weight", (gate * n * d, h))
        self.k = Linear(ck, f"{p}.k_proj.weight", (g * d, h))
        self.v = Linear(ck, f"{p}.v_proj.weight", (g * d, h))
        self.o = Linear(ck, f"{p}.o_proj.weight", (h, n * d))

        def bias(name: str, size: int, present: bool) -> torch.Tensor | None:
            return load_dense(ck, f"{p}.{name}.bias", (size,)) if present else None

        self.q_bias = bias("q_proj", gate * n * d, cfg.attention_bias)
        self.k_bias = bias("k_proj", g * d, cfg.attention_bias)
        self.v_bias = bias("v_proj", g * d, cfg.attention_bias)
        self.o_bias = bias("o_proj", h, cfg.attention_out_bias)
        # per head: one [d] weight shared by the heads; all: one weight over every head's dims
        q_size, k_size = (d, d) if cfg.qk_norm == "head" else (n * d, g * d)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm != "none":
            self.q_norm = load_norm(ck, f"{p}.q_norm.weight", q_size, cfg)
            self.k_norm = load_norm(ck, f"{p}.k_norm.weight", k_size, cfg)
        self.sinks = load_dense(ck, f"{p}.sinks", (n,)) if cfg.attention_sinks else None
        self.window = cfg.window(layer)

    def new_cache(self) -> LayerCache | WindowCache:
        """Every position for a full layer; the last `window` for a sliding one."""
        return WindowCache(keep=self.window) if self.window > 0 else LayerCache()

    def cache_bytes_per_token(self) -> int:
        """What one token adds to this layer's cache: its keys and values, float32 (nothing
        for a sliding layer, whose window is state_bytes)."""
        return 0 if self.window > 0 else 2 * 4 * self.g * self.d

    def state_bytes(self) -> int:
        """The fixed cache one sequence keeps in a sliding layer: its window's keys and values."""
        return 2 * 4 * self.g * self.d * self.window if self.window > 0 else 0

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
        q, k, v = project(x, [self.q, self.k, self.v])
        q, k, v = _biased(q, self.q_bias), _biased(k, self.k_bias), _biased(v, self.v_bias)
        outs = [
            self._attend(qi, ki, vi, cos, sin, softmax_scale, cache, cp)
            for qi, ki, vi, (cos, sin), cache in zip(
                q.split(sizes), k.split(sizes), v.split(sizes), ropes, caches
            )
        ]
        out = _biased(self.o(outs[0] if len(outs) == 1 else torch.cat(outs)), self.o_bias)
        return list(out.split(sizes))  # [T, H] each

    def _attend(self, q, k, v, cos, sin, softmax_scale, cache: LayerCache, cp) -> torch.Tensor:
        """One sequence: q [T, n*d] (with the output gate: [T, n*2d], each head's query then
        its gate), k and v [T, g*d] -> [T, n*d]."""
        eps, t, n, g, d = self.cfg.rms_norm_eps, q.shape[0], self.n, self.g, self.d
        gate = None
        if self.cfg.attention_output_gate:
            q, gate = q.view(t, n, 2 * d).split(d, dim=-1)
            q, gate = q.reshape(t, n * d), gate.reshape(t, n * d)
        qn, kn, mode = self.q_norm, self.k_norm, self.cfg.qk_norm
        if qn is not None and kn is not None and mode == "all":
            q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
        q, k = q.view(t, n, d), k.view(t, g, d)
        if qn is not None and kn is not None and mode == "head":
            q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
        q, k = self._rope(q.transpose(0, 1), cos, sin), self._rope(k.transpose(0, 1), cos, sin)
        v = v.view(t, g, d).transpose(0, 1)  # [g, T, d]
        start = cache.length
        if cp is not None:
            k, v, start = cp.gather(k, dim=1), cp.gather(v, dim=1), start + cp.offset
        scale = d**-0.5 * softmax_scale
        if isinstance(cache, WindowCache):  # the window, then this call's keys
            kk, vv, first = cache.attend_and_append(k, v)
        else:
            kk, vv, first = cache.k.append(k), cache.v.append(v), 0  # [g, S, d], never copied
        out = attend(
            q, kk, vv, start, scale, window=self.window, sinks=self.sinks, key_start=first
        )  # [n, T, d]
        out = out.transpose(0, 1).reshape(t, n * d)
        return out if gate is None else out * torch.sigmoid(gate)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [heads, T, d]: rotate-half rope on the first r dims, the rest as they are."""
        if self.r == self.d:
            return apply_rope(x, cos, sin, False)
        return torch.cat([apply_rope(x[..., : self.r], cos, sin, False), x[..., self.r :]], -1)


class Transformer(DecoderModel):
    """A GQA family's whole model (see DecoderModel.forward): GQA in every layer, then the
    dense MLP or MoE block named `ffn` whose tensors sit where `names` says."""

    ffn = "mlp"
    names = DEEPSEEK

    def __init__(self, ck: Checkpoint, cfg: ModelConfig, *args, **kwargs):
        self.rope_dim = cfg.rotary_dim
        super().__init__(ck, cfg, *args, **kwargs)

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads) -> Block:
        attn = GQA(ck, f"model.layers.{layer}.self_attn", cfg, layer)
        return Block(ck, layer, cfg, attn, expert_dtype, num_threads, self.ffn, self.names)


def _biased(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias
