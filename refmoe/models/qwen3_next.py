"""Qwen3-Next (Qwen3NextForCausalLM): hybrid linear attention. Three of every four layers are
Gated DeltaNet (linear attention: a fixed recurrent state per sequence instead of a growing
cache), the fourth is gated full attention (GQA whose output is scaled by sigmoid of a gate the
query projection computes beside each head; q/k norms, partial rotary 0.25); every RMSNorm
scales by (1 + weight); MoE with a softmax router and one shared expert scaled per token by a
sigmoid gate.

A Gated DeltaNet layer, per token t and value head h (keys and queries L2-normalized, their
heads shared by groups of value heads; beta = sigmoid(b), decay g = -exp(A_log) softplus(a +
dt_bias)):

    S = exp(g) S;   S += k (beta (v - S^T k))^T;   o = S^T q / sqrt(d_k)

after a causal depthwise convolution (kernel linear_conv_kernel_dim, SiLU) over the token's
q, k, v; the output is RMS-normed per head and gated by silu(z). Its cache is the state S
[value heads, d_k, d_v] and the convolution's last kernel - 1 inputs: a sequence's memory
does not grow with its length. Prefill runs the same recurrence token by token (not the chunked
form), in torch on the device.

What this means elsewhere: a linear layer's state cannot be cut at an earlier position, so
these models run without the prefix cache (refmoe.engine turns it off: KVCache.positional),
and a prompt cannot be split across DSLP ranks (refused).

Legend: T = tokens in this call, C = convolution channels (2 hk dk + hv dv), hk / hv = key /
value heads, dk / dv = their widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.models import gqa
from refmoe.models.decoder import Block, smoke
from refmoe.models.experts import QWEN3_NEXT
from refmoe.models.layers import Linear, load_dense, rms_norm


@dataclass(slots=True)
class LinearCache:
    """Per sequence, one linear layer: the convolution's last inputs [C, kernel - 1], the
    recurrent state [hv, dk, dv], and how many tokens they have seen."""

    conv: torch.Tensor | None = None
    state: torch.Tensor | None = None
    n: int = 0
    recurrent = True  # not position-indexed: no prefix can be cut out of it

    @property
    def length(self) -> int:
        return self.n


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet:
    new_cache = LinearCache

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig):
        h = cfg.hidden_size
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv, kernel = (
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
            cfg.linear_conv_kernel_dim,
        )
        self.cfg, self.hk, self.hv, self.dk, self.dv = cfg, hk, hv, dk, dv
        self.channels = 2 * hk * dk + hv * dv
        self.qkvz = Linear(ck, f"{p}.in_proj_qkvz.weight", (2 * hk * dk + 2 * hv * dv, h))
        self.ba = Linear(ck, f"{p}.in_proj_ba.weight", (2 * hv, h))
        conv = load_dense(ck, f"{p}.conv1d.weight", (self.channels, 1, kernel))
        self.conv = conv.contiguous()  # [C, 1, kernel], depthwise
        self.dt_bias = load_dense(ck, f"{p}.dt_bias", (hv,))
        self.a_log = load_dense(ck, f"{p}.A_log", (hv,))
        self.norm = load_dense(ck, f"{p}.norm.weight", (dv,))
        self.out = Linear(ck, f"{p}.out_proj.weight", (h, hv * dv))

    def cache_bytes_per_token(self) -> int:
        """Nothing grows per token (state_bytes is fixed per sequence)."""
        return 0

    def state_bytes(self) -> int:
        """The fixed state one sequence keeps in this layer, float32."""
        kernel = self.conv.shape[-1]
        return 4 * (self.channels * (kernel - 1) + self.hv * self.dk * self.dv)

    def __call__(self, x, cos, sin, softmax_scale, cache: LinearCache, cp=None) -> torch.Tensor:
        return self.batch([x], [(cos, sin)], softmax_scale, [cache], cp)[0]

    def batch(self, xs, ropes, softmax_scale, caches, cp=None) -> list[torch.Tensor]:
        """Several sequences: projections once over all their tokens, the recurrence per
        sequence over its own state."""
        if cp is not None:
            raise ValueError(
                "linear attention (Qwen3-Next) carries a state from token to token: a prompt "
                "cannot be split across DSLP ranks; use one rank"
            )
        sizes = [x.shape[0] for x in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        qkvz, ba = self.qkvz(x), self.ba(x)
        outs = [
            self._sequence(a, b, c) for a, b, c in zip(qkvz.split(sizes), ba.split(sizes), caches)
        ]
        out = self.out(outs[0] if len(outs) == 1 else torch.cat(outs))
        return list(out.split(sizes))

    def _sequence(self, qkvz: torch.Tensor, ba: torch.Tensor, cache: LinearCache) -> torch.Tensor:
        """One sequence's T tokens -> [T, hv * dv]; advances its cache."""
        t, hk, hv, dk, dv = qkvz.shape[0], self.hk, self.hv, self.dk, self.dv
        r = hv // hk  # value heads per key head
        # the projections are laid out per key head: q, k, then its r value heads' v and z
        q, k, v, z = qkvz.view(t, hk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], -1)
        b, a = ba.view(t, hk, 2 * r).split([r, r], -1)
        z, b, a = z.reshape(t, hv, dv), b.reshape(t, hv), a.reshape(t, hv)
        mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], -1)  # [T, C]
        # causal depthwise convolution, continuing from the inputs the cache kept
        kernel = self.conv.shape[-1]
        past = cache.conv if cache.conv is not None else mixed.new_zeros(self.channels, kernel - 1)
        seq = torch.cat([past, mixed.T], dim=1)  # [C, kernel - 1 + T]
        cache.conv = seq[:, seq.shape[1] - (kernel - 1) :].clone()
        mixed = F.silu(F.conv1d(seq[None], self.conv, groups=self.channels)[0]).T  # [T, C]
        q, k, v = mixed.split([hk * dk, hk * dk, hv * dv], -1)
        q = l2_normalize(q.view(t, hk, dk)).repeat_interleave(r, dim=1) * dk**-0.5  # [T, hv, dk]
        k = l2_normalize(k.view(t, hk, dk)).repeat_interleave(r, dim=1)
        v = v.view(t, hv, dv)
        beta = torch.sigmoid(b)  # [T, hv]
        decay = torch.exp(-self.a_log.exp() * F.softplus(a + self.dt_bias))  # [T, hv]
        s = cache.state if cache.state is not None else v.new_zeros(hv, dk, dv)
        out = v.new_empty(t, hv, dv)
        for i in range(t):
            s = s * decay[i][:, None, None]
            remembered = torch.einsum("hkv,hk->hv", s, k[i])
            delta = (v[i] - remembered) * beta[i][:, None]
            s = s + k[i][:, :, None] * delta[:, None, :]
            out[i] = torch.einsum("hkv,hk->hv", s, q[i])
        cache.state, cache.n = s, cache.n + t
        out = rms_norm(out, self.norm, self.cfg.rms_norm_eps) * F.silu(z)  # per head, gated
        return out.reshape(t, hv * dv)


class Transformer(gqa.Transformer):
    """The whole Qwen3-Next model (see DecoderModel.forward)."""

    names = QWEN3_NEXT

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads) -> Block:
        p = f"model.layers.{layer}"
        attn: GatedDeltaNet | gqa.GQA
        if cfg.layer_types[layer] == "linear_attention":
            attn = GatedDeltaNet(ck, f"{p}.linear_attn", cfg)
        else:
            attn = gqa.GQA(ck, f"{p}.self_attn", cfg, layer)
        return Block(ck, layer, cfg, attn, expert_dtype, num_threads, self.ffn, self.names)

    def state_bytes(self) -> int:
        """The fixed state one sequence keeps beside its growing caches."""
        return sum(getattr(b.attn, "state_bytes", lambda: 0)() for b in self.blocks)


if __name__ == "__main__":  # smoke run: python -m refmoe.models.qwen3_next MODEL_DIR
    smoke(Transformer)
