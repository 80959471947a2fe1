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

import torch

from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.models.layers import (Block, DecoderModel, Growing, Linear, apply_rope, attend,
                                  load_dense, mask_causal, rms_norm)


# ---------------------------------------------------------------------------------------------
# MLA: multi-head latent attention with the compressed latent as KV cache
# ---------------------------------------------------------------------------------------------

@dataclass(slots=True)
class LayerCache:
    """Per layer: the MLA cache proper, [S, kv_lora_rank + rope_dim] (the normalized latent and
    the roped key of each token, 576 floats for DeepSeek-V3), in a buffer that grows by
    doubling. Past kv_lora_rank tokens (and always on a GPU) nothing is kept expanded
    through kv_b: decode absorbs kv_b into the query and the output instead (MLA._absorbed),
    so a step reads the cache once and copies none of it."""

    kv: Growing = field(default_factory=lambda: Growing(0))
    # on the CPU, while the sequence is at most kv_lora_rank tokens long: the latents expanded
    # through kv_b, [n, S, nope + v], so that a decode step expands only its own token (a
    # 17 MB FP8 GEMV for V3) instead of reading the 67 MB of absorbed float32 weights;
    # 128 KB a token and layer for V3, dropped once the sequence is longer
    expanded: Growing | None = None

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
        self.kv_a = Linear(ck, f"{p}.kv_a_proj_with_mqa.weight",
                           (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h))
        self.kv_a_norm = load_dense(ck, f"{p}.kv_a_layernorm.weight", (cfg.kv_lora_rank,))
        self.kv_b = Linear(ck, f"{p}.kv_b_proj.weight",
                           (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank))
        self.o = Linear(ck, f"{p}.o_proj.weight", (h, n * cfg.v_head_dim))
        self._absorb = None   # kv_b split for absorbed decode, made on first use

    def cache_bytes_per_token(self) -> int:
        """What one token adds to this layer's cache: the latent and roped key, float32."""
        return 4 * (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, softmax_scale: float,
                 cache: LayerCache, cp=None) -> torch.Tensor:
        """x [T, H] at positions cache.length .. +T; returns [T, H] and extends the cache.
        cp (context parallel): x is this rank's slice; the latent of every rank's tokens is
        gathered into the cache and the queries sit at cp.offset."""
        return self.batch([x], [(cos, sin)], softmax_scale, [cache], cp)[0]

    def batch(self, xs: list[torch.Tensor], ropes, softmax_scale: float,
              caches: list[LayerCache], cp=None) -> list[torch.Tensor]:
        """Several sequences: the projections run once over all their tokens (each weight
        read once per batch); rope, the cache and the attention proper per sequence."""
        cfg = self.cfg
        sizes = [x.shape[0] for x in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)                        # [T, H]
        if cfg.q_lora_rank:
            q = self.q_b(rms_norm(self.q_a(x), self.q_a_norm, cfg.rms_norm_eps))
        else:
            q = self.q(x)
        kv = self.kv_a(x)                                                   # [T, lora + rope]
        latent, k_rot = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = rms_norm(latent, self.kv_a_norm, cfg.rms_norm_eps)         # [T, lora]
        outs = [self._attend(qi, li, ki, cos, sin, softmax_scale, cache, cp)
                for qi, li, ki, (cos, sin), cache in zip(
                    q.split(sizes), latent.split(sizes), k_rot.split(sizes), ropes, caches)]
        out = self.o(outs[0] if len(outs) == 1 else torch.cat(outs))        # [T, H]
        return list(out.split(sizes))

    def _attend(self, q, latent, k_rot, cos, sin, softmax_scale, cache: LayerCache, cp
                ) -> torch.Tensor:
        """One sequence: q [T, n*qk], latent [T, lora], k_rot [T, rope] -> [T, n*v]."""
        cfg, n, t = self.cfg, self.n, q.shape[0]
        q = q.view(t, n, self.qk_head).transpose(0, 1)                      # [n, T, qk]
        q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin, cfg.rope_interleave)            # [n, T, rope]
        k_rot = apply_rope(k_rot, cos, sin, cfg.rope_interleave)            # [T, rope]
        start = cache.length
        new = torch.cat([latent, k_rot], dim=-1)                            # [T, lora + rope]
        if cp is not None:
            new = cp.gather(new)
            start += cp.offset
        cached = cache.kv.append(new)                                       # [S, lora + rope]
        scale = self.qk_head ** -0.5 * softmax_scale
        # Short sequences on the CPU keep their expansion (see LayerCache.expanded); past
        # kv_lora_rank tokens reading it costs more than the absorbed weights, so it goes.
        keep = KEEP_EXPANDED and q.device.type == "cpu" and cached.shape[0] <= cfg.kv_lora_rank
        if not keep:
            cache.expanded = None
        if 0 < t <= ABSORB_MAX_TOKENS and not keep:
            out = self._absorbed(q_nope, q_rot, cached, start, scale)
        else:
            out = self._expanded(q_nope, q_rot, cached, new.shape[0], start, scale,
                                 cache if keep else None)
        return out.transpose(0, 1).reshape(t, n * cfg.v_head_dim)

    def _expanded(self, q_nope, q_rot, cached, fresh, start, scale, keep=None) -> torch.Tensor:
        """Every cached latent expanded through kv_b into per-head keys and values, then plain
        attention: a prompt (one GEMM over S tokens, cheap beside the T x S scores), or a
        short sequence on the CPU, whose expansion `keep` holds so that a step expands only
        its `fresh` rows (a 17 MB FP8 GEMV for V3, where the absorbed weights are 67 MB)."""
        cfg, n = self.cfg, self.n
        s = cached.shape[0]
        latent, k_rot = cached.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        if keep is None:
            kv = self.kv_b(latent).view(s, n, -1).transpose(0, 1)           # [n, S, nope+v]
            k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rot.expand(n, s, -1)], dim=-1)          # [n, S, qk]
            return attend(torch.cat([q_nope, q_rot], dim=-1), k, v, start, scale)
        if keep.expanded is not None and keep.expanded.n == s - fresh:
            kv = keep.expanded.append(
                self.kv_b(latent[s - fresh:]).view(fresh, n, -1).transpose(0, 1))
        else:
            keep.expanded = Growing(1)
            kv = keep.expanded.append(self.kv_b(latent).view(s, n, -1).transpose(0, 1))
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)   # [n, S, .]
        # the rope part against the one shared key, without copying it per head
        scores = (q_nope @ k_nope.transpose(1, 2) + q_rot @ k_rot.T) * scale  # [n, T, S]
        return torch.softmax(mask_causal(scores, start), dim=-1) @ v         # [n, T, v]

    def _absorbed(self, q_nope, q_rot, cached, start, scale) -> torch.Tensor:
        """A few new tokens (decode): kv_b's key half folded into the query and its value half
        applied after, so every head scores against the shared latent directly:
        q_nope . (W_uk c) = (W_uk^T q_nope) . c, and sum_s p_s W_uv c_s = W_uv (sum_s p_s c_s).
        The cache is read as it is, one [n*T, lora + rope] x [S, lora + rope] product."""
        cfg, n, t = self.cfg, self.n, q_nope.shape[1]
        w_uk, w_uv = self._absorb_weights()          # [n, nope, lora], [n, v, lora]
        q_lat = torch.bmm(q_nope, w_uk)                                      # [n, T, lora]
        qc = torch.cat([q_lat, q_rot], dim=-1).reshape(n * t, -1)           # [n*T, lora+rope]
        scores = mask_causal((qc @ cached.T).view(n, t, -1) * scale, start)  # [n, T, S]
        p = torch.softmax(scores, dim=-1).view(n * t, -1)
        o_lat = (p @ cached[:, :cfg.kv_lora_rank]).view(n, t, -1)           # [n, T, lora]
        return torch.bmm(o_lat, w_uv.transpose(1, 2))                       # [n, T, v]

    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b as float32 per head, split into its key and value halves (made once: 4 bytes a
        weight, 67 MB a layer for DeepSeek-V3, where the FP8 codes take 17 MB)."""
        if self._absorb is None:
            cfg = self.cfg
            w = self.kv_b.dense().view(self.n, cfg.qk_nope_head_dim + cfg.v_head_dim,
                                       cfg.kv_lora_rank)
            w_uk, w_uv = w.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            self._absorb = (w_uk.contiguous(), w_uv.contiguous())
        return self._absorb


# new tokens per sequence up to which attention runs absorbed (decode); more run expanded
ABSORB_MAX_TOKENS = 8
# short sequences on the CPU keep their expansion (LayerCache.expanded)
KEEP_EXPANDED = True


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
    import sys

    cfg = ModelConfig.from_file(sys.argv[1])
    model = Transformer(Checkpoint(sys.argv[1]), cfg)
    logits = model.forward(torch.tensor([1, 2, 3]), model.new_cache())
    print(logits.shape, logits[-1].topk(5))
