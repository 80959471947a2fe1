"""DeepSeek-V3 (V3, R1, V3.1, Kimi-K2, Moonlight): MLA attention, noaux_tc group-limited sigmoid
routing, shared experts, first_k_dense_replace dense layers, YaRN rope.

Read top to bottom like DeepSeek's own inference/model.py; rope, norm, loading, the dense
MLP, the gate and the MoE block are shared with other families (layers.py). Here: MLA, the
Transformer, a smoke run. Attention, dense layers, shared experts,
embeddings and lm_head run in torch on the device; routed experts run on the CPU kernels
(refmoe.kernels.fused_moe) from one host copy of their weights. MTP layers (index
num_hidden_layers and beyond) are not loaded.

Legend: T = tokens in this call, S = tokens in the cache, H = hidden, E = routed experts,
K = experts per token, n = heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from refmoe import kernels
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.kernels.formats import WHOLE
from refmoe.models.decoder import Block, DecoderModel, smoke
from refmoe.models.kv_cache import Growing
from refmoe.models.layers import (
    Linear,
    apply_rope,
    attend,
    load_dense,
    mask_causal,
    project,
    rms_norm,
)

# ---------------------------------------------------------------------------------------------
# MLA: multi-head latent attention with the compressed latent as KV cache
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LayerCache:
    """Per layer: the MLA cache, [S, kv_lora_rank + rope_dim] (the normalized latent and the
    roped key of each token, 576 floats for DeepSeek-V3), in a buffer that grows by doubling.
    Nothing else is kept: decode absorbs kv_b into the query and the output instead
    (MLA._absorbed), so a step reads the cache once and copies none of it."""

    kv: Growing = field(default_factory=lambda: Growing(0))

    @property
    def length(self) -> int:
        return self.kv.n


class MLA:
    new_cache = LayerCache

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig):
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.cfg, self.n = cfg, n
        self.qk_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a = Linear(ck, f"{p}.q_a_proj.weight", (cfg.q_lora_rank, h))
            self.q_a_norm = load_dense(ck, f"{p}.q_a_layernorm.weight", (cfg.q_lora_rank,))
            self.q_b = Linear(ck, f"{p}.q_b_proj.weight", (n * self.qk_head, cfg.q_lora_rank))
        else:
            self.q = Linear(ck, f"{p}.q_proj.weight", (n * self.qk_head, h))
        self.kv_a = Linear(
            ck, f"{p}.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        )
        self.kv_a_norm = load_dense(ck, f"{p}.kv_a_layernorm.weight", (cfg.kv_lora_rank,))
        self.kv_b = Linear(
            ck,
            f"{p}.kv_b_proj.weight",
            (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        )
        self.o = Linear(ck, f"{p}.o_proj.weight", (h, n * cfg.v_head_dim))
        self._absorb: Absorbed | None = None  # kv_b split for absorbed decode, made on first use

    def cache_bytes_per_token(self) -> int:
        """What one token adds to this layer's cache: the latent and roped key, float32."""
        return 4 * (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim)

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
        cp (context parallel): x is this rank's slice; the latent of every rank's tokens is
        gathered into the cache and the queries sit at cp.offset."""
        return self.batch([x], [(cos, sin)], softmax_scale, [cache], cp)[0]

    def batch(
        self, xs: list[torch.Tensor], ropes, softmax_scale: float, caches: list[LayerCache], cp=None
    ) -> list[torch.Tensor]:
        """Several sequences: the projections run once over all their tokens (each weight
        read once per batch), and so do absorbed decode's kv_b products; rope, the cache and
        the scores per sequence."""
        cfg = self.cfg
        sizes = [x.shape[0] for x in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [T, H]
        q_resid = None  # the query's normalized low-rank latent (DSA's indexer reads it too)
        if cfg.q_lora_rank:
            q_a, kv = project(x, [self.q_a, self.kv_a])  # kv [T, lora + rope]
            q_resid = rms_norm(q_a, self.q_a_norm, cfg.rms_norm_eps)
            q = self.q_b(q_resid)
        else:
            q, kv = project(x, [self.q, self.kv_a])
        latent, k_rot = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = rms_norm(latent, self.kv_a_norm, cfg.rms_norm_eps)  # [T, lora]
        seqs = [
            self._extend(qi, li, ki, cos, sin, softmax_scale, cache, cp)
            for qi, li, ki, (cos, sin), cache in zip(
                q.split(sizes), latent.split(sizes), k_rot.split(sizes), ropes, caches
            )
        ]
        sels = [
            self.select(xi, ri, cos, sin, cache, sq[3], cp)
            for xi, ri, (cos, sin), cache, sq in zip(
                x.split(sizes),
                q_resid.split(sizes) if q_resid is not None else [None] * len(sizes),
                ropes,
                caches,
                seqs,
            )
        ]
        decode = [
            i for i, sq in enumerate(seqs) if self._absorb_pays(sq[0].shape[1], sq[2].shape[0])
        ]
        got: dict[int, torch.Tensor] = {
            i: self._expanded(*sq, sel=sels[i]) for i, sq in enumerate(seqs) if i not in decode
        }
        if decode:
            absorbed = self._absorbed([seqs[i] for i in decode], [sels[i] for i in decode])
            got.update(zip(decode, absorbed))
        outs = [
            got[i].transpose(0, 1).reshape(t, self.n * cfg.v_head_dim)  # [T, n*v] each
            for i, t in enumerate(sizes)
        ]
        out = self.o(outs[0] if len(outs) == 1 else torch.cat(outs))  # [T, H]
        return list(out.split(sizes))

    def _extend(
        self, q, latent, k_rot, cos, sin, softmax_scale, cache: LayerCache, cp
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
        """One sequence: rope, and its new latents into the cache. q [T, n*qk], latent
        [T, lora], k_rot [T, rope] -> (q_nope [n, T, nope], q_rot [n, T, rope], the cache
        [S, lora + rope], the queries' first position, the softmax scale)."""
        cfg, n, t = self.cfg, self.n, q.shape[0]
        q = q.view(t, n, self.qk_head).transpose(0, 1)  # [n, T, qk]
        q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin, cfg.rope_interleave)  # [n, T, rope]
        k_rot = apply_rope(k_rot, cos, sin, cfg.rope_interleave)  # [T, rope]
        start = cache.length
        new = torch.cat([latent, k_rot], dim=-1)  # [T, lora + rope]
        if cp is not None:
            new = cp.gather(new)
            start += cp.offset
        cached = cache.kv.append(new)  # [S, lora + rope]
        return q_nope, q_rot, cached, start, self.qk_head**-0.5 * softmax_scale

    def select(self, x, q_resid, cos, sin, cache, start: int, cp) -> torch.Tensor | None:
        """The cached positions each new token attends to, [T, k], or None for all of them
        (causal): MLA attends densely; DSA (deepseek_v32.py) picks them with its indexer."""
        return None

    def _expanded(self, q_nope, q_rot, cached, start, scale, sel=None) -> torch.Tensor:
        """Every cached latent expanded through kv_b into per-head keys and values, then plain
        attention: a prompt (one GEMM over S tokens, cheap beside the T x S scores). sel
        [T, k]: the positions each query may attend to (DSA), else every causal one."""
        cfg, n = self.cfg, self.n
        s = cached.shape[0]
        latent, k_rot = cached.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_b(latent).view(s, n, -1).transpose(0, 1)  # [n, S, nope+v]
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(n, s, -1)], dim=-1)  # [n, S, qk]
        allowed = None
        if sel is not None:
            allowed = torch.zeros((sel.shape[0], s), dtype=torch.bool, device=sel.device)
            allowed.scatter_(1, sel, True)  # [T, S]
        return attend(torch.cat([q_nope, q_rot], dim=-1), k, v, start, scale, allowed=allowed)

    def _absorb_pays(self, t: int, s: int) -> bool:
        """Absorbed attention for t new tokens over s cached ones (theirs included): always
        for a few (decode), and for more when it takes fewer FLOPs than expanding every cached
        latent through kv_b (a chunk of a prompt after a long past: chunked prefill, a cached
        prefix) and its [n, t, s] scores fit ABSORB_BYTES."""
        if t <= 0:
            return False
        if t <= ABSORB_MAX_TOKENS:
            return True
        cfg, n = self.cfg, self.n
        lora, rope, nope, v = (
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            cfg.qk_nope_head_dim,
            cfg.v_head_dim,
        )
        absorbed = n * t * 2 * lora * (nope + v) + n * t * s * 2 * (2 * lora + rope)
        expanded = 2 * s * lora * n * (nope + v) + n * t * s * 2 * (nope + rope + v)
        return absorbed < expanded and n * t * s * 4 <= ABSORB_BYTES

    def _absorbed(self, seqs: list[tuple], sels: list) -> list[torch.Tensor]:
        """A few new tokens per sequence (decode): kv_b's key half folded into the query and
        its value half applied after, so every head scores against the shared latent
        directly: q_nope . (W_uk c) = (W_uk^T q_nope) . c, and sum_s p_s W_uv c_s =
        W_uv (sum_s p_s c_s). Each cache is read as it is, one [n*T, lora + rope] x
        [S, lora + rope] product; the two kv_b products run once over every sequence's tokens,
        so the batch reads kv_b once. With a selection (DSA, sels[i] [T, k]) each query scores
        only the k cached rows it selected, gathered: the step's attention reads k rows, not
        S. seqs: _extend's tuples; returns [n, T, v] each."""
        cfg, n = self.cfg, self.n
        w = self._absorb_weights()
        ts = [sq[0].shape[1] for sq in seqs]
        q_lat = w.keys(torch.cat([sq[0] for sq in seqs], dim=1))  # [n, sum T, lora]
        o_lats = []
        for (_, q_rot, cached, start, scale), ql, sel in zip(seqs, q_lat.split(ts, dim=1), sels):
            t = ql.shape[1]
            if sel is not None:
                o_lats.append(
                    self._sparse(torch.cat([ql, q_rot], dim=-1), cached, sel, start, scale)
                )
                continue
            qc = torch.cat([ql, q_rot], dim=-1).reshape(n * t, -1)  # [n*T, lora+rope]
            scores = mask_causal((qc @ cached.T).view(n, t, -1) * scale, start)  # [n, T, S]
            p = torch.softmax(scores, dim=-1).view(n * t, -1)
            o_lats.append((p @ cached[:, : cfg.kv_lora_rank]).view(n, t, -1))  # [n, T, lora]
        return list(w.values(torch.cat(o_lats, dim=1)).split(ts, dim=1))  # [n, T, v] each

    def _sparse(self, qc, cached, sel, start: int, scale: float) -> torch.Tensor:
        """Absorbed attention over selected rows: qc [n, T, lora + rope], sel [T, k] ->
        [n, T, lora]. A selected position ahead of its query (where fewer than k were causal)
        is masked."""
        t = sel.shape[0]
        rows = cached[sel]  # [T, k, lora + rope]
        scores = torch.einsum("ntd,tkd->ntk", qc, rows) * scale
        ahead = sel > (start + torch.arange(t, device=sel.device))[:, None]  # [T, k]
        p = torch.softmax(scores.masked_fill(ahead, float("-inf")), dim=-1)
        return torch.einsum("ntk,tkl->ntl", p, rows[..., : self.cfg.kv_lora_rank])

    def _absorb_weights(self) -> Absorbed:
        if self._absorb is None:
            self._absorb = Absorbed(self.kv_b, self.cfg)
        return self._absorb


class Absorbed:
    """kv_b split per head for absorbed decode: keys(q_nope) = W_uk^T q_nope per head, and
    values(o_lat) = W_uv o_lat per head. FP8 on the CPU (where each head's halves are whole
    row blocks of its scales, as DeepSeek-V3's 128-row blocks are, or one block spans every
    row, per tensor): the value halves are read where they lie in the
    checkpoint and the key halves from a transposed copy of their codes (8.4 MB a V3 layer),
    every head in one kernel call (kernels.fp8_gemm_heads): a step reads kv_b's 17 MB once.
    Otherwise (float weights, a GPU, heads off the scale blocks) float32 per head, made once
    (67 MB a V3 layer)."""

    def __init__(self, kv_b: Linear, cfg: ModelConfig):
        n, nope, v, lora = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        bn, bk = kv_b.block
        whole = kv_b.scale is not None and kv_b.scale.shape[0] == 1  # one row block
        self.fp8 = kv_b.codes is not None and (nope % bn == 0 and v % bn == 0 or whole)
        if self.fp8:
            assert kv_b.codes is not None and kv_b.scale is not None
            codes = kv_b.codes.reshape(n, nope + v, lora)
            if whole:  # every head's halves in the one row block: its scales, each head's
                bn = WHOLE
                scale = np.repeat(kv_b.scale[None], n, 0)  # [n, 1, ceil(lora / bk)]
                sk, sv = scale, scale
            else:
                scale = kv_b.scale.reshape(n, (nope + v) // bn, -1)
                sk, sv = scale[:, : nope // bn], scale[:, nope // bn :]
            self.wk_t = np.ascontiguousarray(codes[:, :nope].transpose(0, 2, 1))  # [n, lora, nope]
            self.sk_t = np.ascontiguousarray(sk.transpose(0, 2, 1))  # transposed: block (bk, bn)
            self.wv, self.sv = codes[:, nope:], sv  # views, [n, v, lora]
            self.block_k, self.block_v = (bk, bn), (bn, bk)
        else:
            w = kv_b.dense().view(n, nope + v, lora)
            w_uk, w_uv = w.split([nope, v], dim=1)
            self.w_uk, self.w_uv = w_uk.contiguous(), w_uv.contiguous()

    def keys(self, q_nope: torch.Tensor) -> torch.Tensor:
        """[n, T, nope] -> [n, T, lora]"""
        if self.fp8:
            x = q_nope.float().contiguous().numpy()
            y = kernels.fp8_gemm_heads(x, self.wk_t, self.sk_t, block=self.block_k)
            return torch.from_numpy(y)
        return torch.bmm(q_nope, self.w_uk)

    def values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """[n, T, lora] -> [n, T, v]"""
        if self.fp8:
            x = o_lat.float().contiguous().numpy()
            y = kernels.fp8_gemm_heads(x, self.wv, self.sv, block=self.block_v)
            return torch.from_numpy(y)
        return torch.bmm(o_lat, self.w_uv.transpose(1, 2))


# new tokens per sequence up to which attention always runs absorbed (decode); more run
# absorbed only where it costs less than expanding the cache (MLA._absorb_pays)
ABSORB_MAX_TOKENS = 8
ABSORB_BYTES = 256 << 20  # the most one absorbed attention's [n, T, S] scores may take


# ---------------------------------------------------------------------------------------------
# Block and Transformer
# ---------------------------------------------------------------------------------------------


class Transformer(DecoderModel):
    """The whole DeepSeek-V3 model (see DecoderModel.forward)."""

    def __init__(self, ck: Checkpoint, cfg: ModelConfig, *args, **kwargs):
        self.rope_dim = cfg.qk_rope_head_dim
        super().__init__(ck, cfg, *args, **kwargs)

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads) -> Block:
        attn = MLA(ck, f"model.layers.{layer}.self_attn", cfg)
        return Block(ck, layer, cfg, attn, expert_dtype, num_threads)


if __name__ == "__main__":  # smoke run: python -m refmoe.models.deepseek_v3 MODEL_DIR
    smoke(Transformer)
