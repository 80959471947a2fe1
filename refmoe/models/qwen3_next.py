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
does not grow with its length. A decode step runs the recurrence itself
(`delta_rule_recurrent`, also the reference); a prompt runs its chunked form
(`delta_rule_chunked`: per chunk of 64 tokens one triangular solve and a handful of matrix
products instead of 64 dependent rank-one updates), in torch on the device.

What this means elsewhere: a linear layer's state cannot be cut at an earlier position, so
the prefix cache keeps snapshots of it at positions the engine marks (LinearCache.marks; see
refmoe/prefix_cache.py), and a prompt cannot be split across DSLP ranks (refused).

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
from refmoe.models.kv_cache import Snapshotted
from refmoe.models.layers import Linear, load_dense, project, rms_norm


@dataclass(slots=True)
class LinearCache(Snapshotted):
    """Per sequence, one linear layer: the convolution's last inputs [C, kernel - 1] and the
    recurrent state [hv, dk, dv], snapshotted for the prefix cache (Snapshotted)."""

    PARTS = ("conv", "state")
    conv: torch.Tensor | None = None
    state: torch.Tensor | None = None


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# The gated delta rule, two ways. Legend: T tokens, H value heads, K / V key / value widths;
# q, k [T, H, K] (q already scaled), v [T, H, V], beta and g (the log decay, <= 0) [T, H],
# state [H, K, V]. Both return (out [T, H, V], the state after the last token).


def delta_rule_recurrent(q, k, v, beta, g, state) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, as the model defines it: the reference, and a decode step. Each head's
    products as batched matrix products, the rank-one update in place on the decayed copy
    (the state passed in is never written): 10x faster than einsum over the same products on
    Qwen3.5's 64 x 128 x 128 state (0.85 against 10 ms a token, one layer, same bits)."""
    s, out = state, v.new_empty(v.shape)
    decay = g.exp()
    for i in range(q.shape[0]):
        s = s * decay[i][:, None, None]  # [H, K, V], a new tensor
        remembered = torch.bmm(k[i][:, None, :], s)[:, 0]  # [H, V]
        s.baddbmm_(k[i][:, :, None], ((v[i] - remembered) * beta[i][:, None])[:, None, :])
        out[i] = torch.bmm(q[i][:, None, :], s)[:, 0]
    return out, s


def delta_rule_chunked(q, k, v, beta, g, state, chunk: int = 64):
    """The same result a chunk of C tokens at a time. Within a chunk that starts from state
    S0, with Gi the running sum of g and the decay from token j to token i exp(Gi - Gj), the
    values each token writes, U = beta (v - what the decayed state already recalls for k),
    depend on one another only through earlier tokens of the chunk:

        (I + A) U = beta (V - exp(G) K S0),   A_ij = beta_i exp(Gi - Gj) k_i.k_j  (j < i)

    a unit lower-triangular solve. Then every output and the next chunk's state are products:

        O = exp(G) Q S0 + (exp(Gi - Gj) q_i.k_j, j <= i) U
        S = exp(G_C) S0 + K^T (exp(G_C - G) U)

    Every exponent is a sum of g <= 0 over a span, so no factor exceeds 1."""
    t = q.shape[0]
    out, s = v.new_empty(v.shape), state
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()  # [C, C], j <= i
    for c0 in range(0, t, chunk):
        n = min(chunk, t - c0)
        qc, kc, vc = (x[c0 : c0 + n].transpose(0, 1) for x in (q, k, v))  # [H, n, K|V]
        bc = beta[c0 : c0 + n].T[:, :, None]  # [H, n, 1]
        # the running log decay and every factor from it in float64, then q's dtype: Gi - Gj
        # in float32 is a difference of two sums that reach -1,000 within a chunk of strong
        # decays, and its rounding (~1e-4 there) became the factor's relative error
        gc = g[c0 : c0 + n].T.to(torch.float64).cumsum(-1)  # [H, n]
        span = gc[:, :, None] - gc[:, None, :]  # [H, n, n], Gi - Gj
        decay = span.masked_fill(~causal[:n, :n], float("-inf")).exp().to(q.dtype)
        start = gc.exp().to(q.dtype)[:, :, None]  # [H, n, 1], decay from the chunk's start
        a = bc * decay * (kc @ kc.transpose(1, 2))  # [H, n, n]; its diagonal is ignored
        rhs = bc * (vc - start * (kc @ s))  # [H, n, V]
        u = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
        out[c0 : c0 + n] = (start * (qc @ s) + (decay * (qc @ kc.transpose(1, 2))) @ u).transpose(
            0, 1
        )
        to_end = (gc[:, -1:] - gc).exp().to(q.dtype)[:, :, None]  # [H, n, 1]
        s = gc[:, -1].exp().to(q.dtype)[:, None, None] * s + kc.transpose(1, 2) @ (to_end * u)
    return out, s


RECURRENT_TOKENS = 8  # up to this many new tokens (decode, a short chunk) run token by token


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
        self.load_projections(ck, p, h)
        conv = load_dense(ck, f"{p}.conv1d.weight", (self.channels, 1, kernel))
        self.conv = conv.contiguous()  # [C, 1, kernel], depthwise
        self.dt_bias = load_dense(ck, f"{p}.dt_bias", (hv,))
        self.a_log = load_dense(ck, f"{p}.A_log", (hv,))
        self.norm = load_dense(ck, f"{p}.norm.weight", (dv,))
        self.out = Linear(ck, f"{p}.out_proj.weight", (h, hv * dv))

    def load_projections(self, ck: Checkpoint, p: str, h: int) -> None:
        hk, hv, dk, dv = self.hk, self.hv, self.dk, self.dv
        self.qkvz = Linear(ck, f"{p}.in_proj_qkvz.weight", (2 * hk * dk + 2 * hv * dv, h))
        self.ba = Linear(ck, f"{p}.in_proj_ba.weight", (2 * hv, h))

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
                "linear attention (Qwen3-Next, Qwen3.5) carries a state from token to token: a "
                "prompt cannot be split across DSLP ranks; use one rank"
            )
        sizes = [x.shape[0] for x in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        mixed, z, b, a = (p.split(sizes) for p in self.project(x))
        outs = [self._sequence(*one) for one in zip(mixed, z, b, a, caches)]
        out = self.out(outs[0] if len(outs) == 1 else torch.cat(outs))
        return list(out.split(sizes))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, H] -> the convolution's input q|k|v [T, C], the gate z [T, hv, dv], b and a
        [T, hv]. Qwen3-Next lays its two projections out per key head: q, k, then its r value
        heads' v and z; then its r b's and r a's."""
        t, hk, hv, dk, dv = x.shape[0], self.hk, self.hv, self.dk, self.dv
        r = hv // hk  # value heads per key head
        qkvz, ba = project(x, [self.qkvz, self.ba])
        q, k, v, z = qkvz.view(t, hk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], -1)
        b, a = ba.view(t, hk, 2 * r).split([r, r], -1)
        mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], -1)  # [T, C]
        return mixed, z.reshape(t, hv, dv), b.reshape(t, hv), a.reshape(t, hv)

    def _sequence(self, mixed, z, b, a, cache: LinearCache) -> torch.Tensor:
        """One sequence's T tokens (project's parts) -> [T, hv * dv]; advances its cache."""
        t, hk, hv, dk, dv = mixed.shape[0], self.hk, self.hv, self.dk, self.dv
        r = hv // hk
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
        g = -self.a_log.exp() * F.softplus(a + self.dt_bias)  # [T, hv], log decay
        s = cache.state if cache.state is not None else v.new_zeros(hv, dk, dv)
        # the marked positions this call passes cut it into pieces, each piece's end state kept
        n0 = cache.n
        cuts = sorted({m - n0 for m in cache.marks if n0 < m < n0 + t} | {t})
        outs, lo = [], 0
        for hi in cuts:
            rule = delta_rule_recurrent if hi - lo <= RECURRENT_TOKENS else delta_rule_chunked
            o, s = rule(q[lo:hi], k[lo:hi], v[lo:hi], beta[lo:hi], g[lo:hi], s)
            outs.append(o)
            if n0 + hi in cache.marks:  # the inputs before it, and the state (never mutated)
                cache.snaps[n0 + hi] = (seq[:, hi : hi + kernel - 1].clone(), s)
            lo = hi
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        cache.state, cache.n = s, n0 + t
        out = rms_norm(out, self.norm, self.cfg.rms_norm_eps) * F.silu(z)  # per head, gated
        return out.reshape(t, hv * dv)


class Transformer(gqa.Transformer):
    """The whole Qwen3-Next model (see DecoderModel.forward)."""

    names = QWEN3_NEXT
    linear = GatedDeltaNet

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads) -> Block:
        p = f"model.layers.{layer}"
        attn: GatedDeltaNet | gqa.GQA
        if cfg.layer_types[layer] == "linear_attention":
            attn = self.linear(ck, f"{p}.linear_attn", cfg)
        else:
            attn = gqa.GQA(ck, f"{p}.self_attn", cfg, layer)
        return Block(ck, layer, cfg, attn, expert_dtype, num_threads, self.ffn, self.names)


if __name__ == "__main__":  # smoke run: python -m refmoe.models.qwen3_next MODEL_DIR
    smoke(Transformer)
