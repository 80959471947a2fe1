"""DeepSeek-V4 (DeepseekV4ForCausalLM; V4-Flash, V4-Pro), read top to bottom:

- the residual is hc_mult streams per token (mHC, manifold-constrained hyper-connections):
  before each attention or MoE block the streams collapse into one input ("pre" weights),
  after it the block's output expands back ("post") and the input streams are mixed into it
  by a doubly stochastic matrix ("comb", Sinkhorn-Knopp); all three come from the streams by
  a small learned projection (HyperConnection). A final HyperHead collapses them for the norm
  and lm_head;
- attention has one shared key-value head (the key is the value), q through a low-rank
  projection with a per-head unweighted RMSNorm, interleaved rope on the last rotary dims of
  each head (undone on the output at the query's position), a learned sink per head, and a
  grouped low-rank output projection (o_groups blocks of heads, each to o_lora_rank, then one
  mix to hidden). Every layer attends over a sliding window of its own tokens; a compressed
  layer also over compressed entries of the whole past: every `rate` tokens' projections are
  pooled by a softmax gate (with a learned bias per slot) into one normed, roped entry.
  HCA (heavily compressed, rate 128) attends to every entry; CSA (compressed sparse, rate 4)
  pools overlapping windows (2 x rate tokens: the previous window's first half-series and this
  window's second) and attends only to the index_topk entries a lightning indexer scores
  highest for each query (its own smaller compressor and query heads);
- every layer is MoE: a sqrt(softplus) router with a correction bias for the choice, the
  first layers routed by a fixed token -> experts table (hash_moe), experts and the shared
  expert with a clamped SiLU (silu(min(g, limit)) * clamp(u, -limit, limit)).

The cache of a layer is bounded as the reference's is (LayerCache): the roped key-values of
the last sliding_window positions, the compressors' inputs of the windows not closed yet (and,
for overlapping ones, of the last closed window, which the next entry pools too), and the
pooled entries of every closed window, which never change. Only the entries grow: one per
`rate` positions (CSA: head_dim + the indexer's index_head_dim floats per 4 positions, HCA:
head_dim per 128), against head_dim floats a position on every layer for a cache that kept
every position. The window and the open windows cannot be cut at an earlier position, so
the prefix cache snapshots them (kv_cache.Snapshotted) and cuts the entries by position.

Tensor names: DeepSeek's as released (layers.N.attn.wq_a, ffn.experts.N.w1, hc_attn_fn,
embed, head, ...; transformers' save_pretrained writes them too) are read as transformers
names them in memory (hf_name; transformers' conversion mapping says the same). The MTP
layer (num_nextn_predict_layers) is not used (no speculative decoding). Legend: T = tokens in
the call, S = cached positions, n = query heads, D = head_dim, r = rotary dims, E = compressed
entries, c = hc_mult.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from refmoe import costmodel, kernels
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.kernels import formats
from refmoe.models.decoder import DecoderModel, smoke
from refmoe.models.experts import MoE
from refmoe.models.kv_cache import Growing, Snapshotted
from refmoe.models.layers import (
    Linear,
    load_dense,
    load_norm,
    project,
    rms_norm,
    rope_parameters,
)
from refmoe.trace import maybe

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"

# DeepSeek's release names, inside a layer, -> transformers' (applied in this order)
_LAYER_NAMES = [
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.(shared_experts|experts\.\d+)\.w1\.", r".\1.gate_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w2\.", r".\1.down_proj."),
    (r"\.(shared_experts|experts\.\d+)\.w3\.", r".\1.up_proj."),
]


def hf_name(name: str) -> str:
    """The name transformers gives a tensor DeepSeek's release stores as `name` (names
    already in transformers' form come back unchanged)."""
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    bare = name.removeprefix("model.")
    if bare in ("norm.weight", "embed_tokens.weight") or bare.startswith("hc_head."):
        return "model." + bare
    m = re.fullmatch(r"hc_head_(fn|base|scale)", bare)
    if m:
        return f"model.hc_head.hc_{m.group(1)}"
    if not bare.startswith("layers."):
        return name
    if bare.endswith(".scale") and not bare.endswith("_hc.scale"):  # FP8 / FP4 block scales
        bare = bare[: -len(".scale")] + ".weight_scale_inv"
    for pattern, repl in _LAYER_NAMES:
        bare = re.sub(pattern, repl, bare)
    return "model." + bare


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, d] with its last r = 2 x cos.shape[-1] dims turned by interleaved pairs
    (x[2i], x[2i+1]) at angles cos/sin [T, r/2]; the pairs stay where they are."""
    r = 2 * cos.shape[-1]
    head, tail = x[..., : x.shape[-1] - r], x[..., x.shape[-1] - r :]
    a, b = tail[..., 0::2], tail[..., 1::2]
    turned = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([head, turned], dim=-1)


class Rope:
    """The two rope kinds: main (rope_theta, sliding-only layers) and compress
    (compress_rope_theta with its scaling: compressed layers, their entries and indexer)."""

    def __init__(self, cfg: ModelConfig, main: torch.Tensor):
        """main: the model's inv_freq (DecoderModel's, from rope_theta unscaled)."""
        r = cfg.rotary_dim
        self.main = main
        squeezed = dataclasses.replace(
            cfg, rope_theta=cfg.compress_rope_theta, rope_scaling=cfg.compress_rope_scaling
        )
        self.compress, self.compress_factor, _ = rope_parameters(squeezed, r)

    def angles(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, r/2] at positions [T]."""
        inv, factor = (self.main, 1.0) if kind == "main" else (self.compress, self.compress_factor)
        freqs = positions.float()[:, None] * inv.to(positions.device)[None, :]
        return freqs.cos() * factor, freqs.sin() * factor


# ---------------------------------------------------------------------------------------------
# Hyper-connections
# ---------------------------------------------------------------------------------------------


class HyperConnection:
    """(post [T, c], comb [T, c, c], collapsed [T, H]) from the streams X [T, c, H]."""

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig):
        c, h = cfg.hc_mult, cfg.hidden_size
        self.c, self.eps, self.iters, self.norm_eps = (
            c,
            cfg.hc_eps,
            cfg.hc_sinkhorn_iters,
            cfg.rms_norm_eps,
        )
        self.fn = load_dense(ck, f"{p}.fn", ((2 + c) * c, c * h))
        self.base = load_dense(ck, f"{p}.base", ((2 + c) * c,))
        self.scale = load_dense(ck, f"{p}.scale", (3,))
        self._fn, self._base, self._scale = (
            np.ascontiguousarray(w.float().numpy()) for w in (self.fn, self.base, self.scale)
        )

    def __call__(self, x: torch.Tensor):
        """One kernel call (kernels.hyper_collapse): some twenty torch operations of 5-10 us
        each on a 2-vCPU VM became one of about 60 us, twice per layer and token."""
        post, comb, col = kernels.hyper_collapse(
            np.ascontiguousarray(x.detach().float().numpy()),
            self._fn,
            self._base,
            self._scale,
            self.norm_eps,
            self.eps,
            self.iters,
        )
        return torch.from_numpy(post), torch.from_numpy(comb), torch.from_numpy(col)

    def reference(self, x: torch.Tensor):
        """The same in torch, operation by operation as transformers (tests compare)."""
        t, c = x.shape[0], self.c
        mix = rms_norm(x.reshape(t, -1), None, self.norm_eps) @ self.fn.T  # [T, (2 + c) c]
        pre_w, post_w, comb_w = mix.split([c, c, c * c], dim=-1)
        pre_b, post_b, comb_b = self.base.split([c, c, c * c])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = torch.softmax(comb_w.view(t, c, c) * self.scale[2] + comb_b.view(c, c), -1)
        return post, self._sinkhorn(comb + self.eps), (pre.unsqueeze(-1) * x).sum(1)

    def _sinkhorn(self, comb: torch.Tensor) -> torch.Tensor:
        """Sinkhorn-Knopp on [T, c, c]: columns, then rows and columns in turn, to sum to 1.
        kernels.sinkhorn: the same float32 operations as transformers' torch loop (and as the
        numpy loop this replaced, bit for bit) in one C call: 7 against 290 us (numpy) for 20
        iterations on the 2-vCPU VM, and decode runs two per layer."""
        a = kernels.sinkhorn(comb.detach().cpu().numpy(), self.iters, self.eps)
        return torch.from_numpy(a).to(comb.device)


def expand(post: torch.Tensor, comb: torch.Tensor, y: torch.Tensor, x: torch.Tensor):
    """The streams after a block: its output y [T, H] spread by post, plus the input streams
    x [T, c, H] mixed by comb (sum over the first stream axis: comb^T x)."""
    return post.unsqueeze(-1) * y.unsqueeze(-2) + comb.transpose(-1, -2) @ x


class HyperHead:
    def __init__(self, ck: Checkpoint, cfg: ModelConfig):
        c, h = cfg.hc_mult, cfg.hidden_size
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.fn = load_dense(ck, "model.hc_head.hc_fn", (c, c * h))
        self.base = load_dense(ck, "model.hc_head.hc_base", (c,))
        self.scale = load_dense(ck, "model.hc_head.hc_scale", (1,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mixes = rms_norm(x.reshape(x.shape[0], -1), None, self.norm_eps) @ self.fn.T  # [T, c]
        pre = torch.sigmoid(mixes * self.scale + self.base) + self.eps
        return (pre.unsqueeze(-1) * x).sum(1)


# ---------------------------------------------------------------------------------------------
# Compressed attention: the cache, the compressors, the indexer
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LayerCache(Snapshotted):
    """One layer of one sequence, bounded: kv, the roped key-values of the last `keep`
    positions [<= keep, D]; on a compressed layer (rate > 0) ckv / cgate (and the indexer's
    ikv / igate), the compressors' projections [P, wide] of positions tail_start(n) .. n - 1,
    which the entries still to close pool; entries / index_keys, the pooled entries of the
    n // rate windows closed so far (Growing, a row per `rate` positions). The parts a
    sliding layer lacks are empty tensors. The window and the projections are snapshotted at
    the marks for the prefix cache (Snapshotted); the entries are positional rows."""

    PARTS = ("kv", "ckv", "cgate", "ikv", "igate")
    keep: int = 0
    rate: int = 0
    overlap: bool = False
    kv: torch.Tensor | None = None
    ckv: torch.Tensor | None = None
    cgate: torch.Tensor | None = None
    ikv: torch.Tensor | None = None
    igate: torch.Tensor | None = None
    entries: Growing | None = None
    index_keys: Growing | None = None

    def tail_start(self, n: int) -> int:
        """The first position whose projections a cache of n positions still needs: the open
        window's first, or with overlap the last closed window's (entry w pools window w - 1's
        first half-series)."""
        if not self.rate:
            return n
        closed = n // self.rate
        return max(0, (closed - 1 if self.overlap else closed) * self.rate)

    def set(self, n: int, *parts: torch.Tensor) -> None:
        if len(parts) != len(self.PARTS):  # named by Snapshotted.set
            return Snapshotted.set(self, n, *parts)
        kv, tail = parts[0].shape[0], parts[1].shape[0]
        if kv > min(self.keep, n) or (self.rate and tail != n - self.tail_start(n)):
            raise ValueError(
                f"a DeepSeek-V4 layer snapshot after {n} tokens holds {kv} window positions "
                f"and {tail} open-window ones (window {self.keep}, rate {self.rate})"
            )
        Snapshotted.set(self, n, *parts)

    def extend(self, kv: torch.Tensor, projections: list[torch.Tensor]):
        """Take this call's kv [T, D] (positions n .. n + T) and compressor projections (ckv,
        cgate, ikv, igate as the layer has them). Returns (keys, first): the window then kv, and
        the first key's position; (tails, base): the held projections then this call's, and
        their first position. Keeps what later calls need and, for each mark in (n, n + T],
        the parts as they stand after it."""
        assert self.kv is not None
        t, first, base = kv.shape[0], self.n - self.kv.shape[0], self.tail_start(self.n)
        keys = torch.cat([self.kv, kv])
        held = [getattr(self, name) for name in self.PARTS[1:]]
        tails = [torch.cat([h, p]) for h, p in zip(held, projections)]
        tails += held[len(tails) :]  # the parts this layer lacks stay empty
        for m in self.marks:
            if self.n < m <= self.n + t:
                lo = self.tail_start(m) - base
                window = keys[max(0, m - self.keep - first) : m - first].clone()
                self.snaps[m] = (window, *(p[lo : m - base].clone() for p in tails))
        self.n += t
        self.kv = _last(keys, keys.shape[0] - self.keep)
        cut = self.tail_start(self.n) - base
        self.ckv, self.cgate, self.ikv, self.igate = (_last(p, cut) for p in tails)
        return keys, first, tails, base


def _last(t: torch.Tensor, cut: int) -> torch.Tensor:
    """t from row cut on; a copy when that frees most of t (a prompt's tensors)."""
    kept = t[max(0, cut) :]
    return kept.clone() if cut > kept.shape[0] else kept


class Compressor:
    """Pools every `rate` positions' kv projections into one entry of `width`: softmax over the
    window's slots of gate + position_bias per channel, the weighted sum, an RMSNorm, rope
    (compress kind) at the window's first position. overlap (CSA and its indexer): the
    projections are 2 x width, and entry w pools window w-1's first half-series with window
    w's second (the first window's missing half has weight zero)."""

    def __init__(
        self, ck: Checkpoint, p: str, cfg: ModelConfig, rate: int, width: int, overlap: bool
    ):
        h, wide = cfg.hidden_size, (2 if overlap else 1) * width
        self.rate, self.width, self.overlap, self.eps = rate, width, overlap, cfg.rms_norm_eps
        self.kv = Linear(ck, f"{p}.kv_proj.weight", (wide, h))
        self.gate = Linear(ck, f"{p}.gate_proj.weight", (wide, h))
        self.bias = load_dense(ck, f"{p}.position_bias", (rate, wide))
        self.norm = load_norm(ck, f"{p}.kv_norm.weight", width, cfg)

    def entries(
        self, ckv: torch.Tensor, cgate: torch.Tensor, lo: int, hi: int, rope: Rope, base: int = 0
    ):
        """Entries lo .. hi [hi - lo, width] from the projections [P, wide] of positions base ..
        base + P (which must hold window lo - 1's with overlap, else window lo's, to hi's)."""
        r, w, n = self.rate, self.width, hi - lo
        if n <= 0:
            return ckv.new_zeros((0, w))
        at = lo * r - base
        if at < 0 or (self.overlap and lo > 0 and at < r) or hi * r - base > ckv.shape[0]:
            raise ValueError(f"entries {lo}..{hi} need positions the projections from {base} lack")
        kv = ckv[at : at + n * r].reshape(n, r, -1)
        gate = cgate[at : at + n * r].reshape(n, r, -1) + self.bias
        if self.overlap:
            prev_kv = ckv.new_zeros((n, r, w))
            prev_gate = cgate.new_full((n, r, w), float("-inf"))
            if lo > 0:
                prev_kv[0] = ckv[at - r : at, :w]
                prev_gate[0] = cgate[at - r : at, :w] + self.bias[:, :w]
            prev_kv[1:], prev_gate[1:] = kv[:-1, :, :w], gate[:-1, :, :w]
            kv = torch.cat([prev_kv, kv[..., w:]], dim=1)  # [n, 2r, w]
            gate = torch.cat([prev_gate, gate[..., w:]], dim=1)
        pooled = (kv * gate.softmax(dim=1)).sum(1)  # [n, w]
        pooled = rms_norm(pooled, self.norm, self.eps)
        cos, sin = rope.angles("compress", torch.arange(lo, hi, device=ckv.device) * r)
        return rope_tail(pooled, cos, sin)


class Indexer:
    """The lightning indexer of a CSA layer: its own overlapping compressor (index_head_dim
    wide) gives keys; queries from q's low-rank residual (index_n_heads heads, roped at their
    positions); a query's score of entry e is sum over heads of w_h relu(q_h . k_e) (w from
    the layer input); each query keeps its index_topk best entries among those whose window
    has closed before it."""

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig, rate: int):
        self.n, self.d, self.topk, self.rate = (
            cfg.index_n_heads,
            cfg.index_head_dim,
            cfg.index_topk,
            rate,
        )
        self.compressor = Compressor(ck, p, cfg, rate, self.d, overlap=True)
        rank = cfg.q_lora_rank or 0  # positive (validated)
        self.q = Linear(ck, f"{p}.q_b_proj.weight", (self.n * self.d, rank))
        self.weights = Linear(ck, f"{p}.scorer.weights_proj.weight", (self.n, cfg.hidden_size))

    def allowed(self, x, q_res, positions, keys, angles, budget_bytes: int = 1 << 28):
        """[T, E] bool: the entries each query attends to. angles: the compressed rope's
        (cos, sin) at positions, which the layer's attention (CSA: rope kind compress) has
        computed already. The scores of a block of queries at a time, under budget_bytes (a
        prompt chunk of 8K queries against 32K entries would hold 1 GB of them)."""
        t, e = x.shape[0], keys.shape[0]
        allowed = torch.zeros((t, e), dtype=torch.bool, device=x.device)
        if e == 0:
            return allowed
        q = self.q(q_res).view(t, self.n, self.d).transpose(0, 1)  # [n, T, d]
        q = rope_tail(q, *angles)
        w = self.weights(x) * self.n**-0.5  # [T, n]
        closed = (positions + 1) // self.rate  # entries before each query
        block = max(1, budget_bytes // (4 * e))
        for lo in range(0, t, block):
            hi = min(t, lo + block)
            index = self.scores(q[:, lo:hi], w[lo:hi], keys, closed[lo:hi])  # -inf: not closed
            top = index.topk(min(self.topk, e), dim=-1).indices
            allowed[lo:hi].scatter_(1, top, top < closed[lo:hi, None])
        return allowed

    def scores(self, q, w, keys, closed: torch.Tensor) -> torch.Tensor:
        """[T, E]: sum over heads h of w[t, h] relu(q[h, t] . k_e) / sqrt(d) for q [n, T, d] and
        the entries e < closed[t], -inf for the rest: one kernel pass over the keys on the CPU
        (kernels.indexer_scores, which skips the entries past each query's), torch elsewhere
        (reference)."""
        if q.device.type != "cpu" or q.dtype != torch.float32 or keys.dtype != torch.float32:
            return self.reference(q, w, keys, closed)
        qt = np.ascontiguousarray(q.transpose(0, 1).numpy())  # [T, n, d]
        ws = np.ascontiguousarray((w * self.d**-0.5).numpy())  # relu(s) a = relu(s a), a > 0
        limits = closed.to(torch.int32).numpy()
        return torch.from_numpy(
            kernels.indexer_scores(qt, ws, np.ascontiguousarray(keys.numpy()), limits)
        )

    def reference(self, q, w, keys, closed: torch.Tensor) -> torch.Tensor:
        """The scores as transformers computes them: relu(q @ keys.T) / sqrt(d), weighted by w
        and summed over heads (an n x T x E intermediate), the entries not closed masked."""
        scores = torch.relu(q @ keys.T) * self.d**-0.5  # [n, T, E]
        index = (scores * w.T.unsqueeze(-1)).sum(0)
        future = torch.arange(keys.shape[0], device=q.device)[None, :] >= closed[:, None]
        return index.masked_fill(future, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class Attention:
    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig, layer: int):
        h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        g, lora = cfg.o_groups, cfg.o_lora_rank
        self.cfg, self.n, self.d, self.g, self.lora = cfg, n, d, g, lora
        self.kind = cfg.layer_types[layer]
        self.rope_kind = "main" if self.kind == "sliding_attention" else "compress"
        self.window, self.eps = cfg.sliding_window, cfg.rms_norm_eps
        rank = cfg.q_lora_rank or 0  # positive (validated)
        self.q_a = Linear(ck, f"{p}.q_a_proj.weight", (rank, h))
        self.q_a_norm = load_norm(ck, f"{p}.q_a_norm.weight", rank, cfg)
        self.q_b = Linear(ck, f"{p}.q_b_proj.weight", (n * d, rank))
        self.kv = Linear(ck, f"{p}.kv_proj.weight", (d, h))
        self.kv_norm = load_norm(ck, f"{p}.kv_norm.weight", d, cfg)
        self.o_a = Linear(ck, f"{p}.o_a_proj.weight", (g * lora, n * d // g))
        self.o_b = Linear(ck, f"{p}.o_b_proj.weight", (h, g * lora))
        self.sinks = load_dense(ck, f"{p}.sinks", (n,))
        self.rate = cfg.compress_rates.get(self.kind, 0)
        self.compressor = self.indexer = None
        if self.kind != "sliding_attention":
            c = f"{p}.compressor"
            self.compressor = Compressor(ck, c, cfg, self.rate, d, overlap=self.kind == CSA)
            if self.kind == CSA:
                self.indexer = Indexer(ck, f"{c}.indexer", cfg, self.rate)
        self._o_a_dense: torch.Tensor | None = None

    def new_cache(self) -> LayerCache:
        d, csa = self.d, self.kind == CSA
        wide = (2 if csa else 1) * d if self.rate else 0
        iwide = 2 * self.indexer.d if self.indexer is not None else 0
        empty = torch.empty
        cache = LayerCache(keep=self.window, rate=self.rate, overlap=csa, kv=empty(0, d))
        cache.ckv, cache.cgate, cache.ikv, cache.igate = (
            empty(0, wide),
            empty(0, wide),
            empty(0, iwide),
            empty(0, iwide),
        )
        if self.rate:
            cache.entries = Growing(0, self.rate)
            cache.entries.append(empty(0, d))
        if self.indexer is not None:
            cache.index_keys = Growing(0, self.rate)
            cache.index_keys.append(empty(0, self.indexer.d))
        return cache

    def cache_bytes_per_token(self) -> int:
        """What the cache grows by a position, in float32: its share of an entry (and the
        indexer's key) on a compressed layer, nothing on a sliding one (its window is
        state_bytes); costmodel.v4_cache_values, which the simulator counts too."""
        return math.ceil(4 * costmodel.v4_cache_values(self.cfg, self.kind)[0])

    def state_bytes(self) -> int:
        """The fixed part of a sequence's cache at its largest, in float32: the window's
        key-values and the compressors' projections of up to one open window (two with
        overlap) less a position (costmodel.v4_cache_values)."""
        return 4 * costmodel.v4_cache_values(self.cfg, self.kind)[1]

    def _compressed(self, cache: LayerCache, tails, base: int, start: int, t: int, rope: Rope):
        """Pool the windows this call closed into the cache's entries (and the indexer's
        keys); returns both, every closed window's."""
        assert self.compressor is not None and cache.entries is not None
        have, closed = start // self.rate, (start + t) // self.rate
        entries = cache.entries.append(
            self.compressor.entries(tails[0], tails[1], have, closed, rope, base)
        )
        keys = None
        if self.indexer is not None:
            assert cache.index_keys is not None
            ic = self.indexer.compressor
            keys = cache.index_keys.append(ic.entries(tails[2], tails[3], have, closed, rope, base))
        return entries, keys

    def grouped_out(self, o: torch.Tensor) -> torch.Tensor:
        """o [T, n D] -> hidden: each of the g head groups to o_lora_rank (o_a, block
        diagonal), then o_b over them all."""
        t, g, lora = o.shape[0], self.g, self.lora
        xg = o.reshape(t, g, -1)
        a = self.o_a
        bn, bk = a.block
        # FP8: every group through the kernels at once where its rows are whole row blocks of
        # the scales (or one block holds every row); else the dequantized weight
        split = a.scale is not None and lora % bn == 0
        whole = a.scale is not None and a.scale.shape[0] == 1
        if a.codes is not None and a.scale is not None and (split or whole):
            if split:
                scale, block = a.scale.reshape(g, lora // bn, -1), (bn, bk)
            else:
                scale, block = np.repeat(a.scale[None], g, 0), (formats.WHOLE, bk)
            x = np.ascontiguousarray(xg.transpose(0, 1).float().numpy())  # [g, T, K]
            y = kernels.fp8_gemm_heads(
                x, a.codes.reshape(g, lora, -1), np.ascontiguousarray(scale), block=block
            )
            ya = torch.from_numpy(y).transpose(0, 1)  # [T, g, lora]
        else:
            if self._o_a_dense is None:
                self._o_a_dense = a.dense().view(g, lora, -1)
            ya = torch.einsum("tgk,gok->tgo", xg, self._o_a_dense.to(xg.device))
        return self.o_b(ya.reshape(t, g * lora))

    def __call__(self, x: torch.Tensor, cache: LayerCache, rope: Rope, cp=None) -> torch.Tensor:
        """x [T, H] (the collapsed, normed streams) at positions cache.length .. + T. cp
        (context parallel, DSLP): x is this rank's slice of a chunk, its queries at cp.offset;
        every rank's key-values and compressor inputs are gathered, so every rank's cache
        takes the whole chunk (and pools the same entries)."""
        t, n, d = x.shape[0], self.n, self.d
        start = cache.length  # the chunk's first position
        mine = start + (cp.offset if cp is not None else 0)  # this call's first query
        positions = torch.arange(mine, mine + t, device=x.device)
        cos, sin = rope.angles(self.rope_kind, positions)
        weights = [self.q_a, self.kv]  # every projection of x, in one kernel call
        if self.compressor is not None:
            weights += [self.compressor.kv, self.compressor.gate]
        if self.indexer is not None:
            weights += [self.indexer.compressor.kv, self.indexer.compressor.gate]
        q_a, kv, *projections = project(x, weights)
        q_res = rms_norm(q_a, self.q_a_norm, self.eps)
        q = rms_norm(self.q_b(q_res).view(t, n, d), None, self.eps).transpose(0, 1)
        q = rope_tail(q, cos, sin)  # [n, T, D]
        kv = rope_tail(rms_norm(kv, self.kv_norm, self.eps), cos, sin)  # [T, D]
        if cp is not None:
            kv, projections = cp.gather(kv), [cp.gather(p) for p in projections]
        keys, first, tails, base = cache.extend(kv, projections)  # keys [W + T, D]
        entries, allowed = None, None
        if self.compressor is not None:
            entries, index_keys = self._compressed(cache, tails, base, start, kv.shape[0], rope)
            if self.indexer is not None:
                # an indexer sits on CSA layers, whose own rope kind is the compressed one
                allowed = self.indexer.allowed(x, q_res, positions, index_keys, (cos, sin))
            else:  # HCA: every entry whose window closed before the query
                e = entries.shape[0]
                closed = (positions + 1) // self.rate
                allowed = torch.arange(e, device=x.device)[None, :] < closed[:, None]
        if t == 0:  # a rank that only hosts the prefill: its cache took the chunk
            return x.new_zeros((0, self.cfg.hidden_size))
        out = self._attend(q, keys, first, entries, allowed, mine)  # [n, T, D]
        out = rope_tail(out, cos, -sin)  # the value's rope undone at the query's position
        return self.grouped_out(out.transpose(0, 1).reshape(t, n * d))

    def _attend(self, q, keys, first, entries, allowed, start, budget_bytes: int = 1 << 28):
        """Softmax over [the window's keys; the allowed entries; the head's sink] of each
        query; the value is the key. keys: positions first .. start + T. Query blocks keep the
        scores under budget_bytes; a block scores only the entries one of its queries may see
        (a CSA decode step: its top-k)."""
        n, t, d = q.shape
        e = 0 if entries is None else entries.shape[0]
        block = max(1, min(t, budget_bytes // max(1, n * (self.window + t + e) * 4)))
        outs = []
        for lo in range(0, t, block):
            hi = min(t, lo + block)
            oldest = max(0, start + lo - self.window + 1)
            kv = keys[oldest - first : start + hi - first]  # [W, D]
            qpos = start + torch.arange(lo, hi, device=q.device)[:, None]  # [b, 1]
            kpos = oldest + torch.arange(kv.shape[0], device=q.device)[None, :]
            hidden = (kpos > qpos) | (kpos <= qpos - self.window)  # [b, W]
            if e:
                seen = allowed[lo:hi]  # only the entries some query of the block attends to:
                cols = seen.any(0).nonzero().squeeze(1)  # a decode step's top-k, not all E
                kv = torch.cat([kv, entries[cols]])
                hidden = torch.cat([hidden, ~seen[:, cols]], dim=1)
            scores = (q[:, lo:hi] @ kv.T) * d**-0.5  # [n, b, W + E]
            scores = scores.masked_fill(hidden, float("-inf"))
            sink = self.sinks.to(scores.dtype).view(n, 1, 1).expand(n, hi - lo, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
            outs.append(probs @ kv)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------
# The block and the model
# ---------------------------------------------------------------------------------------------


class Block:
    """Streams in, streams out: attention on the collapsed streams, then the MoE block."""

    def __init__(self, ck: Checkpoint, layer: int, cfg: ModelConfig, expert_dtype, num_threads):
        p = f"model.layers.{layer}"
        self.layer, self.eps = layer, cfg.rms_norm_eps
        self.attn = Attention(ck, f"{p}.self_attn", cfg, layer)
        self.attn_norm = load_norm(ck, f"{p}.input_layernorm.weight", cfg.hidden_size, cfg)
        self.ffn_norm = load_norm(ck, f"{p}.post_attention_layernorm.weight", cfg.hidden_size, cfg)
        self.attn_hc = HyperConnection(ck, f"{p}.attn_hc", cfg)
        self.ffn_hc = HyperConnection(ck, f"{p}.ffn_hc", cfg)
        self.ffn = MoE(ck, f"{p}.mlp", cfg, expert_dtype, num_threads)
        hashed = cfg.mlp_layer_types[layer] == "hash_moe"
        if hashed != (self.ffn.gate.tid2eid is not None):
            raise ValueError(
                f"{ck.dir}: {p}.mlp.gate.tid2eid: mlp_layer_types says {cfg.mlp_layer_types[layer]}"
                f" but the checkpoint {'lacks' if hashed else 'has'} the table"
            )

    def attention(self, xs: list[torch.Tensor], caches: list, rope: Rope, cp=None):
        """Per sequence: streams [T_i, c, H] -> streams after the attention block (cp: one
        sequence's slice of a DSLP chunk, see Attention)."""
        out = []
        for x, cache in zip(xs, caches):
            post, comb, col = self.attn_hc(x)
            y = self.attn(rms_norm(col, self.attn_norm, self.eps), cache, rope, cp)
            out.append(expand(post, comb, y, x))
        return out

    def moe(self, x: torch.Tensor, tokens: torch.Tensor, streamed=None) -> torch.Tensor:
        """Streams [T, c, H] of every sequence together, with their token ids [T]."""
        post, comb, col = self.ffn_hc(x)
        self.ffn.gate.tokens = tokens
        y = self.ffn(rms_norm(col, self.ffn_norm, self.eps), streamed, self.layer)
        return expand(post, comb, y, x)


class Transformer(DecoderModel):
    """The whole DeepSeek-V4 model (see DecoderModel.forward)."""

    def __init__(self, ck: Checkpoint, cfg: ModelConfig, *args, **kwargs):
        ck.rename(hf_name, "under DeepSeek's release name")
        self.rope_dim = cfg.rotary_dim
        super().__init__(ck, cfg, *args, **kwargs)
        self.hc_head = HyperHead(ck, cfg)
        self.rope = Rope(cfg, self.inv_freq)
        if self.device.type != "cpu":
            raise ValueError("DeepSeek-V4 runs its attention on the CPU for now (--device cpu)")

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads):
        return Block(ck, layer, cfg, expert_dtype, num_threads)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The streams [T, c, H] collapsed by the hyper-connection head, then the final norm
        and lm_head."""
        return super()._head(self.hc_head(x))

    @torch.no_grad()
    def forward(
        self, ids: torch.Tensor, cache, experts=None, cp=None, logits: str = "all"
    ) -> torch.Tensor:
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be all, last or none, got {logits!r}")
        ids = ids.to(self.device)
        # the MoE layers route every rank's tokens (SLP's exchange gathers the streams): a
        # hash router needs every rank's token ids
        tokens = cp.gather(ids) if cp is not None else ids
        x = self.embed[ids].unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        try:
            for block, layer_cache in zip(self.blocks, cache.layers):
                t = x.shape[0]
                with maybe(
                    self.trace, "device", "attention", f"attention L{block.layer}", tokens=t
                ):
                    x = block.attention([x], [layer_cache], self.rope, cp)[0]
                where = "slp" if experts is not None else "cpu"
                with maybe(self.trace, where, "experts", f"experts L{block.layer}", tokens=t):
                    x = block.moe(x, tokens, experts)
        finally:
            if experts is not None:
                experts.close()
        return self._logits(x, logits)

    @torch.no_grad()
    def forward_batch(self, ids: list[torch.Tensor], caches: list, locks=None) -> torch.Tensor:
        """Several sequences: attention per sequence over its own cache, the MoE layers once
        over every sequence's tokens. Returns each sequence's last logits [B, V]."""
        from contextlib import nullcontext

        attn_lock, ffn_lock = locks or (nullcontext(), nullcontext())
        c = self.cfg.hc_mult
        ids = [i.to(self.device) for i in ids]
        xs = [self.embed[i].unsqueeze(1).expand(-1, c, -1).contiguous() for i in ids]
        tokens, sizes = torch.cat(ids), [i.shape[0] for i in ids]
        for layer, block in enumerate(self.blocks):
            with attn_lock:
                xs = block.attention(xs, [cc.layers[layer] for cc in caches], self.rope)
            with ffn_lock:
                xs = list(block.moe(torch.cat(xs), tokens).split(sizes))
        return self._head(torch.stack([x[-1] for x in xs]))


if __name__ == "__main__":  # smoke run: python -m refmoe.models.deepseek_v4 MODEL_DIR
    smoke(Transformer)
