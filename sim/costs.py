"""What one token costs, per layer, from a ModelConfig: the weight bytes each part reads.

Counts match the engine's own (refmoe.demo.bytes_per_token): FP8 projections are codes plus
one float32 scale per block of the config's (128x128, per channel, ...); routed experts count
top-k plus the shared one. Routed
experts are counted in their stored format (a 4-bit one that quantization_config names, else
FP8); attention, dense layers, shared experts and lm_head as FP8, whatever the checkpoint
holds (Kimi K2-Thinking keeps them in BF16: twice these bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from refmoe import costmodel
from refmoe.config import ModelConfig


def fp8_bytes(n: int, k: int, block: tuple[int, int] = (128, 128)) -> int:
    return costmodel.fp8_matrix_bytes(n, k, block)


@dataclass(slots=True, frozen=True)
class LayerCost:
    attention_bytes: int  # projections of the attention block
    expert_bytes: int  # routed top-k + shared experts read by one token (MoE layers)
    dense_bytes: int  # dense MLP (first_k_dense_replace layers)


def attention_bytes(cfg: ModelConfig) -> int:
    return sum(fp8_bytes(a, b, cfg.fp8_block) for a, b in costmodel.attention_shapes(cfg))


def routed_expert_bytes(cfg: ModelConfig) -> int:
    """One routed expert in its stored format."""
    return costmodel.expert_bytes(cfg)


def shared_expert_bytes(cfg: ModelConfig) -> int:
    """The shared experts of one layer (FP8)."""
    i, h = cfg.moe_intermediate_size, cfg.hidden_size
    return cfg.n_shared_experts * 3 * fp8_bytes(i, h, cfg.fp8_block)


def expert_bytes(cfg: ModelConfig) -> int:
    return cfg.num_experts_per_tok * routed_expert_bytes(cfg) + shared_expert_bytes(cfg)


def layer_costs(cfg: ModelConfig) -> list[LayerCost]:
    attn, experts = attention_bytes(cfg), expert_bytes(cfg)
    dense = 3 * fp8_bytes(cfg.intermediate_size, cfg.hidden_size, cfg.fp8_block)
    return [
        LayerCost(attn, experts if cfg.is_moe_layer(i) else 0, 0 if cfg.is_moe_layer(i) else dense)
        for i in range(cfg.num_hidden_layers)
    ]


def head_bytes(cfg: ModelConfig) -> int:
    return fp8_bytes(cfg.vocab_size, cfg.hidden_size, cfg.fp8_block)


def bytes_per_token(cfg: ModelConfig) -> int:
    return sum(
        c.attention_bytes + c.expert_bytes + c.dense_bytes for c in layer_costs(cfg)
    ) + head_bytes(cfg)


def attention_flops(cfg: ModelConfig, tokens: int, past: int = 0) -> float:
    """FLOPs of one attention block over `tokens` new tokens after `past` cached ones: the
    projections (2 x tokens x weights; an FP8 weight is one byte) and the causal scores and
    weighted sums (score_flops)."""
    return 2.0 * tokens * attention_bytes(cfg) + score_flops(cfg, tokens, past)


def score_flops(cfg: ModelConfig, tokens: int, past: int = 0, dense: bool = False) -> float:
    """The scores and weighted sums of `tokens` new tokens after `past` cached ones, one layer's
    worth averaged over the layers: each new token attends to past + its own position in every
    head, or (sliding-window layers, gpt-oss) to its last `sliding_window` positions only, or
    (DSA) to the index_topk its indexer picks, the indexer scoring every key. dense: what the
    engine's torch attention on the CPU computes instead (refmoe.models.layers.attend): every
    new token's scores over every key up to the last new one (past + tokens; with a window, the
    window and the new tokens), the causal rule and DSA's choice applied as masks."""
    per_key = 2.0 * cfg.num_attention_heads * costmodel.score_dims(cfg)
    full: float = tokens * (past + tokens) if dense else attended_keys(tokens, past, 0)
    if cfg.family == "deepseek_v4":
        return _v4_score_flops(cfg, tokens, past, dense, per_key, full)
    linear = costmodel.linear_share(cfg)
    if linear:  # Gated DeltaNet layers: a fixed recurrence per token, whatever the context
        recurrent = tokens * costmodel.recurrent_flops(cfg)
        return (1 - linear) * per_key * full + linear * recurrent
    if cfg.is_dsa:  # MLA over each token's top index_topk; the indexer over every key
        shared = cfg.indexer_types.count("shared") / max(len(cfg.indexer_types), 1)
        indexer = 2.0 * cfg.index_n_heads * cfg.index_head_dim * (1 - shared)
        picked = full if dense else attended_keys(tokens, past, cfg.index_topk)
        return per_key * picked + indexer * full
    sliding = costmodel.sliding_share(cfg)
    if not sliding:
        return per_key * full
    window: float
    if dense:
        window = tokens * min(past + tokens, cfg.sliding_window + tokens)
    else:
        window = attended_keys(tokens, past, cfg.sliding_window)
    return per_key * ((1 - sliding) * full + sliding * window)


def _v4_score_flops(
    cfg: ModelConfig, tokens: int, past: int, dense: bool, per_key: float, full: float
) -> float:
    """DeepSeek-V4: every layer its sliding window; a CSA layer also the index_topk of the
    entries closed before the token (one per 4 tokens) and its indexer's scores over all of
    them; an HCA layer every entry (one per 128). dense (the engine on the CPU): a block of
    queries scores every entry one of them picked (at most all of them) and every HCA entry,
    masked, as the window's keys past it."""
    csa, hca = costmodel.v4_shares(cfg)
    rate_c = cfg.compress_rates.get("compressed_sparse_attention", 4)
    rate_h = cfg.compress_rates.get("heavily_compressed_attention", 128)
    w = cfg.sliding_window
    window = tokens * min(past + tokens, w + tokens) if dense else attended_keys(tokens, past, w)
    if dense:
        picked = tokens * min((past + tokens) / rate_c, tokens * cfg.index_topk)
    else:
        picked = attended_keys(tokens, past, cfg.index_topk * rate_c) / rate_c
    indexer = 2.0 * cfg.index_n_heads * cfg.index_head_dim * full / rate_c
    return per_key * (window + csa * picked + hca * full / rate_h) + csa * indexer


def recurrent_part(cfg: ModelConfig, tokens: int) -> float:
    """What score_flops counts for the linear-attention layers (their share of the layers):
    the recurrence over `tokens` new tokens, whatever the context; 0 without such layers."""
    return costmodel.linear_share(cfg) * tokens * costmodel.recurrent_flops(cfg)


def attended_keys(tokens: int, past: int, window: int) -> float:
    """Keys attended, summed over `tokens` new tokens after `past` cached ones: the token at
    position p sees p + 1 keys, or min(p + 1, window) with a window."""
    a, b = past + 1, past + tokens  # keys seen by the first and the last new token
    if window <= 0 or b <= window:
        return (a + b) * tokens / 2
    if a >= window:
        return float(window * tokens)
    return (a + window) * (window - a + 1) / 2 + (b - window) * window


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """One cached token of one layer as a GPU engine keeps it in BF16: MLA's compressed latent
    and rotary key (DeepSeek-V3: 576 values), or GQA's keys and values; averaged over the
    layers where some are linear attention (they cache no token)."""
    if cfg.is_mla:
        return 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if cfg.family == "deepseek_v4":  # the entries a token adds (its window is a fixed state)
        grown = [costmodel.v4_cache_values(cfg, kind)[0] for kind in cfg.layer_types]
        return round(2 * sum(grown) / len(grown))
    # a sliding layer keeps only its window (state_bytes)
    full = 1 - costmodel.linear_share(cfg) - costmodel.sliding_share(cfg)
    return round(2 * 2 * cfg.num_key_value_heads * cfg.head_dim * full)


def state_bytes(cfg: ModelConfig) -> int:
    """The fixed state one sequence keeps, all layers together: each linear-attention layer's
    recurrent state [value heads, d_k, d_v] in float32 and its convolution's last kernel - 1
    inputs in BF16, and each sliding-window layer's window of keys and values in BF16 (as
    refmoe keeps it: gqa.WindowCache; DeepSeek-V4's windows and open compressor windows:
    _v4_state_bytes); 0 for a model with none of them."""
    types = cfg.layer_types or []
    linear = types.count("linear_attention")
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    channels = 2 * hk * dk + hv * dv
    if cfg.family == "deepseek_v4":
        return _v4_state_bytes(cfg)
    per = 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.sliding_window
    windows = types.count("sliding_attention") * per
    return linear * (4 * hv * dk * dv + 2 * channels * (cfg.linear_conv_kernel_dim - 1)) + windows


def _v4_state_bytes(cfg: ModelConfig) -> int:
    """DeepSeek-V4, in BF16: every layer's window of key-values and the compressors' open
    windows, as refmoe keeps them (costmodel.v4_cache_values; the entries a token adds are
    kv_bytes_per_token)."""
    return sum(2 * costmodel.v4_cache_values(cfg, kind)[1] for kind in cfg.layer_types)


def model_bytes(cfg: ModelConfig) -> int:
    """The whole model as the engine holds it in host memory: every layer's attention, all
    routed experts (their stored format) and shared ones or its dense MLP, lm_head and the
    embeddings (BF16)."""
    routed = cfg.n_routed_experts * routed_expert_bytes(cfg) + shared_expert_bytes(cfg)
    layers = sum(
        c.attention_bytes + (routed if c.expert_bytes else c.dense_bytes) for c in layer_costs(cfg)
    )
    return layers + head_bytes(cfg) + 2 * cfg.vocab_size * cfg.hidden_size
