"""DeepSeek-V3.2 (DeepseekV32ForCausalLM): DeepSeek-V3 with DeepSeek Sparse Attention (DSA);
GLM-5 (glm_moe_dsa.py) runs the same with two differences (config fields): its indexer ropes
interleaved, and `shared` layers reuse the selection of the full layer before them.
A lightning indexer scores every cached token for each new one, cheaply (index_n_heads heads of
index_head_dim, one shared key per token, ReLU'd dot products weighted per head), and each
query attends through MLA to the index_topk tokens it scores highest (2,048 in the release);
until the context is longer than that, attention is dense MLA.

The indexer keeps its own cache of keys ([S, index_head_dim], layer-normed, roped on the first
qk_rope_head_dim dims with rotate-half, unlike MLA's interleaved rope) beside the latent. Decode
(absorbed MLA, deepseek_v3.MLA._sparse) gathers the selected latents and scores those alone,
so a step's attention reads index_topk rows at any context; the indexer reads every cached key
(index_head_dim floats a token, an eighth of a latent's 576 for V3.2). A prompt attends in
expanded form with the selection as a mask.

Legend: T = tokens in this call, S = tokens in the cache, h = indexer heads, d = indexer width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.models import deepseek_v3
from refmoe.models.decoder import Block, smoke
from refmoe.models.kv_cache import Growing, KVCache
from refmoe.models.layers import Linear, apply_rope, load_dense, mask_causal


@dataclass(slots=True)
class LayerCache(deepseek_v3.LayerCache):
    """MLA's latent cache and the indexer's keys, [S, d]; `picked`: the positions this call's
    tokens attend to (what shared layers after it reuse), None for all."""

    keys: Growing = field(default_factory=lambda: Growing(0))
    picked: torch.Tensor | None = None


@dataclass(slots=True)
class SharedLayerCache(deepseek_v3.LayerCache):
    """A shared layer (GLM-5): MLA's latent cache, and the cache of the full layer whose
    selection it reuses (linked by Transformer.new_cache)."""

    source: LayerCache | None = None


class Indexer:
    """The lightning indexer of one layer: which cached tokens each new token attends to."""

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig):
        h, d = cfg.index_n_heads, cfg.index_head_dim
        assert cfg.q_lora_rank is not None  # config.py requires it for this family
        self.cfg, self.h, self.d = cfg, h, d
        self.wq_b = Linear(ck, f"{p}.wq_b.weight", (h * d, cfg.q_lora_rank))
        self.wk = Linear(ck, f"{p}.wk.weight", (d, cfg.hidden_size))
        self.k_norm = load_dense(ck, f"{p}.k_norm.weight", (d,))
        self.k_norm_bias = load_dense(ck, f"{p}.k_norm.bias", (d,))
        self.weights_proj = Linear(ck, f"{p}.weights_proj.weight", (h, cfg.hidden_size))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rope on the first qk_rope_head_dim dims of x [..., T, d]: rotate-half (V3.2) or
        interleaved pairs (GLM-5)."""
        r, inter = self.cfg.qk_rope_head_dim, self.cfg.index_rope_interleave
        return torch.cat([apply_rope(x[..., :r], cos, sin, inter), x[..., r:]], dim=-1)

    def __call__(
        self, x, q_resid, cos, sin, cache: LayerCache, start: int, cp, budget_bytes: int = 1 << 28
    ) -> torch.Tensor | None:
        """x [T, H], q_resid [T, q_lora] at positions start .. start+T -> the positions each
        token attends to, [T, k] with k = min(index_topk, S), or None when every cached token
        is within the top-k (S <= index_topk: dense). Appends the new keys to cache.keys."""
        t, h, d = x.shape[0], self.h, self.d
        k = F.layer_norm(self.wk(x), (d,), self.k_norm, self.k_norm_bias, 1e-6)  # [T, d]
        k = self._rope(k, cos, sin)
        if cp is not None:
            k = cp.gather(k)
        keys = cache.keys.append(k)  # [S, d]
        s = keys.shape[0]
        if s <= self.cfg.index_topk or t == 0:
            return None
        q = self._rope(self.wq_b(q_resid).view(t, h, d).transpose(0, 1), cos, sin)  # [h, T, d]
        w = self.weights_proj(x) * h**-0.5  # [T, h]
        block = max(1, min(t, budget_bytes // max(1, h * s * 4)))
        picks = []
        for lo in range(0, t, block):
            hi = min(t, lo + block)
            scores = torch.relu(q[:, lo:hi] @ keys.T * d**-0.5)  # [h, b, S]
            index = torch.einsum("bh,hbs->bs", w[lo:hi], scores)  # [b, S]
            index = mask_causal(index, start + lo)
            picks.append(index.topk(self.cfg.index_topk, dim=-1).indices)
        return picks[0] if len(picks) == 1 else torch.cat(picks)


class DSA(deepseek_v3.MLA):
    """MLA whose queries attend to the tokens the indexer selects: its own indexer's (a full
    layer), or the previous full layer's (a shared one, GLM-5)."""

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig, layer: int):
        super().__init__(ck, p, cfg)
        self.shared = bool(cfg.indexer_types) and cfg.indexer_types[layer] == "shared"
        self.indexer = None if self.shared else Indexer(ck, f"{p}.indexer", cfg)
        self.new_cache = SharedLayerCache if self.shared else LayerCache

    def cache_bytes_per_token(self) -> int:
        """The latent and roped key, and (a full layer) the indexer's key, float32."""
        own = 0 if self.shared else 4 * self.cfg.index_head_dim
        return super().cache_bytes_per_token() + own

    def select(self, x, q_resid, cos, sin, cache, start, cp) -> torch.Tensor | None:
        if self.indexer is None:
            assert cache.source is not None  # linked by Transformer.new_cache
            return cache.source.picked
        cache.picked = self.indexer(x, q_resid, cos, sin, cache, start, cp)
        return cache.picked


class Transformer(deepseek_v3.Transformer):
    """The whole DeepSeek-V3.2 model (see DecoderModel.forward)."""

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads) -> Block:
        attn = DSA(ck, f"model.layers.{layer}.self_attn", cfg, layer)
        return Block(ck, layer, cfg, attn, expert_dtype, num_threads)

    def new_cache(self) -> KVCache:
        """Per layer its cache; each shared layer's linked to the last full layer's before it."""
        cache = super().new_cache()
        full = None
        for layer in cache.layers:
            if isinstance(layer, SharedLayerCache):
                layer.source = full
            else:
                full = layer
        return cache


if __name__ == "__main__":  # smoke run: python -m refmoe.models.deepseek_v32 MODEL_DIR
    smoke(Transformer)
