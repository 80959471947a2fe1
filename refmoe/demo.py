"""`refmoe demo`: a model with DeepSeek-V3's per-layer shapes, sized to this machine.

Built once into a cache directory as a real FP8 checkpoint (config.json with
quantization_config, safetensors with weight + weight_scale_inv): hidden 7168, MLA with V3's
dims, 2048-wide experts, top-8 routing over 8 groups plus one shared expert, seeded random
weights. Only the number of layers, the number of routed experts per layer and the vocabulary
are cut down, so each decoded token reads what one V3 layer reads, times the layers kept.

--expert-format mxfp4 | nvfp4 | int4g stores the routed experts as the 4-bit releases do
(gpt-oss / DeepSeek-V4 MXFP4, ModelOpt NVFP4, Kimi K2-Thinking's compressed-tensors INT4; the
layouts of refmoe/convert.py), with attention and the shared expert in FP8, as DeepSeek-V4
keeps them.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refmoe import kernels
from refmoe.checkpoint import save_file
from refmoe.kernels import formats

V3_LAYER = dict(
    hidden_size=7168,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    moe_intermediate_size=2048,
    intermediate_size=18432,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_interleave=True,
)
EXPERT_BYTES = 3 * 2048 * 7168 + 3 * 16 * 56 * 4  # codes + scales of one FP8 expert


# DeepSeek-V3.2's lightning indexer as released: 64 heads of 128, each query's top 2,048
V32_INDEXER = dict(index_n_heads=64, index_head_dim=128, index_topk=2048)
# one layer of each GQA family as published (GLM-4.5-Air, MiniMax-M2, gpt-oss-120b), all MoE
GQA_LAYERS = {
    "glm4_moe": dict(
        architectures=["Glm4MoeForCausalLM"],
        hidden_size=4096,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        partial_rotary_factor=0.5,
        attention_bias=True,
        use_qk_norm=False,
        moe_intermediate_size=1408,
        intermediate_size=10944,
        n_shared_experts=1,
        num_experts_per_tok=8,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
    ),
    "minimax_m2": dict(
        architectures=["MiniMaxM2ForCausalLM"],
        hidden_size=3072,
        num_attention_heads=48,
        num_key_value_heads=8,
        head_dim=128,
        rotary_dim=64,
        intermediate_size=1536,
        num_experts_per_tok=8,
        use_qk_norm=True,
        rms_norm_eps=1e-6,
        rope_theta=5e6,
    ),
    "gpt_oss": dict(
        architectures=["GptOssForCausalLM"],
        hidden_size=2880,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=2880,
        num_experts_per_tok=4,
        sliding_window=128,
        attention_bias=True,
        rms_norm_eps=1e-5,
        rope_theta=150000.0,
    ),
    # Qwen3-235B-A22B: per-head q/k norms, softmax top-8 of 128 (normalized), no shared expert
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        hidden_size=4096,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        moe_intermediate_size=1536,
        intermediate_size=12288,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
    ),
    # Qwen3-Next-80B-A3B: three Gated DeltaNet layers to one of gated full attention
    "qwen3_next": dict(
        architectures=["Qwen3NextForCausalLM"],
        hidden_size=2048,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        partial_rotary_factor=0.25,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_experts_per_tok=10,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=1e7,
    ),
    # Qwen3.5-397B-A17B (its FP8 release's layout): Qwen3-Next's layers with a linear layer's
    # input projections as four plain matrices, 512 experts top-10, a gated shared expert
    "qwen3_5_moe": dict(
        architectures=["Qwen3_5MoeForCausalLM"],
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=256,
        partial_rotary_factor=0.25,
        linear_num_key_heads=16,
        linear_num_value_heads=64,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
        num_experts_per_tok=10,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=1e7,
    ),
}
QWEN_LINEAR = ("qwen3_next", "qwen3_5_moe")  # Gated DeltaNet layers, three to one full
# DeepSeek-V4-Flash's layer (transformers' DeepseekV4Config defaults, documented as
# deepseek-ai/DeepSeek-V4-Flash-Base): one KV head of 512, 64 query heads, grouped output
# projection, 4 residual streams, CSA / HCA compressed attention beside a 128-token window
V4_LAYER = dict(
    hidden_size=4096,
    moe_intermediate_size=2048,
    num_attention_heads=64,
    num_key_value_heads=1,
    head_dim=512,
    q_lora_rank=1024,
    num_experts_per_tok=6,
    n_shared_experts=1,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    sliding_window=128,
    o_groups=8,
    o_lora_rank=1024,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    compress_rope_theta=160000.0,
    partial_rotary_factor=64 / 512,
    swiglu_limit=10.0,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)
FAMILIES = ("deepseek_v3", "deepseek_v32", "deepseek_v4", *GQA_LAYERS)


def demo_config(
    layers: int,
    experts: int,
    vocab: int = 8192,
    expert_format: str = "fp8",
    family: str = "deepseek_v3",
    shape: dict | None = None,
) -> dict:
    """The demo model's config.json: DeepSeek-V3's layer shapes (deepseek_v32: and V3.2's
    DSA indexer). shape: other layer shapes in place of V3's (hidden_size,
    moe_intermediate_size, num_experts_per_tok, num_attention_heads, ...; DeepSeek families
    only), for models of shapes the simulator was not calibrated on."""
    from refmoe.convert import QUANTIZATION_CONFIG

    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "deepseek_v4":
        if shape:
            raise ValueError("shape overrides are for the DeepSeek-V3 families")
        return _v4_config(layers, experts, vocab, expert_format)
    if family in GQA_LAYERS:
        if shape:
            raise ValueError(f"shape overrides are for the DeepSeek families, not {family!r}")
        return _gqa_config(family, layers, experts, vocab, expert_format)
    unknown = sorted(set(shape or {}) - set(V3_LAYER))
    if unknown:
        raise ValueError(f"shape: unknown layer fields {', '.join(unknown)}")
    if experts % 8 or experts < 16:
        raise ValueError(f"experts per layer must be a multiple of 8 and >= 16, got {experts}")
    if expert_format not in QUANTIZATION_CONFIG:
        raise ValueError(
            f"--expert-format must be one of {', '.join(QUANTIZATION_CONFIG)}, got "
            f"{expert_format!r}"
        )
    v32 = family == "deepseek_v32"
    return dict(
        architectures=["DeepseekV32ForCausalLM" if v32 else "DeepseekV3ForCausalLM"],
        model_type=family,
        vocab_size=vocab,
        num_hidden_layers=layers,
        n_routed_experts=experts,
        first_k_dense_replace=0,
        max_position_embeddings=163840,
        bos_token_id=0,
        eos_token_id=None,
        tie_word_embeddings=False,
        quantization_config=QUANTIZATION_CONFIG[expert_format],
        **{**V3_LAYER, **(shape or {})},
        **(V32_INDEXER if v32 else {}),
    )


def _v4_config(layers: int, experts: int, vocab: int, expert_format: str) -> dict:
    """DeepSeek-V4's demo config: V4-Flash's layer, FP8 projections with E8M0 scales and FP4
    routed experts as released (expert_dtype fp4); layers as transformers lays them out (two
    HCA, then CSA and HCA in turn), the first three MoE layers hash-routed."""
    if expert_format != "mxfp4":
        raise ValueError(
            f"--family deepseek_v4: its demo's experts are FP4 as released (--expert-format "
            f"mxfp4), got {expert_format!r}"
        )
    top_k = 6  # V4_LAYER's num_experts_per_tok
    if experts < top_k:
        raise ValueError(f"experts per layer must be at least {top_k}, got {experts}")
    return dict(
        architectures=["DeepseekV4ForCausalLM"],
        model_type="deepseek_v4",
        vocab_size=vocab,
        num_hidden_layers=layers,
        n_routed_experts=experts,
        layer_types=["heavily_compressed_attention"] * min(layers, 2)
        + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
            for i in range(max(layers - 2, 0))
        ],
        mlp_layer_types=["hash_moe"] * min(layers, 3) + ["moe"] * max(0, layers - 3),
        max_position_embeddings=1048576,
        bos_token_id=0,
        eos_token_id=None,
        tie_word_embeddings=False,
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "scale_fmt": "ue8m0",
            "expert_dtype": "fp4",
        },
        **V4_LAYER,
    )


def _gqa_config(family: str, layers: int, experts: int, vocab: int, expert_format: str) -> dict:
    """A GQA family's demo config: its published layer; FP8 projections and experts, except
    gpt-oss's experts, MXFP4 as released (its only format)."""
    from refmoe.convert import QUANTIZATION_CONFIG

    oss = family == "gpt_oss"
    if expert_format != ("mxfp4" if oss else "fp8"):
        raise ValueError(
            f"--family {family}: its demo's experts are {'mxfp4' if oss else 'fp8'} "
            f"(--expert-format), got {expert_format!r}"
        )
    count = {
        "glm4_moe": "n_routed_experts",
        "qwen3_next": "num_experts",
        "qwen3_5_moe": "num_experts",
        "qwen3_moe": "num_experts",
    }.get(family, "num_local_experts")
    cfg = dict(
        model_type=family,
        vocab_size=vocab,
        num_hidden_layers=layers,
        max_position_embeddings=131072,
        bos_token_id=0,
        eos_token_id=None,
        tie_word_embeddings=False,
        quantization_config=QUANTIZATION_CONFIG[expert_format],
        **GQA_LAYERS[family],
    )
    cfg[count] = experts
    if oss:
        cfg["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ]
    if family in QWEN_LINEAR:  # every fourth layer full, and the last (fewer than 4 layers)
        cfg["layer_types"] = [
            "full_attention" if i % 4 == 3 or i == layers - 1 else "linear_attention"
            for i in range(layers)
        ]
    return cfg


def size_for_memory(available: int, fraction: float = 0.4) -> tuple[int, int]:
    """(layers, experts) whose checkpoint fits in fraction of the available memory: 32 experts
    per layer when that allows 2+ layers, up to 4 layers."""
    per_layer = lambda e: (e + 1) * EXPERT_BYTES + 200 * 2**20  # noqa: E731 (+ attention)
    budget = available * fraction
    for experts in (32, 16):
        layers = int(budget // per_layer(experts))
        if layers >= 2:
            return min(layers, 4), experts
    return 1, 16


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


class _Codes:
    """Seeded FP8 codes with the distribution of block-quantized Gaussian weights, fast: draws
    from a pool of 2^16 encoded Gaussian samples instead of encoding every weight."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        pool = self.rng.standard_normal(2**16) * (448 / 4.5)  # amax ~ 4.5 sigma -> 448
        self.pool = formats.fp8_encode(np.clip(pool, -448, 448))

    def matrix(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        codes = self.pool[self.rng.integers(0, 2**16, size=(n, k), dtype=np.uint16)]
        scale = self.rng.uniform(0.5, 1.5, formats.scale_shape(n, k)).astype(np.float32)
        return codes, scale * np.float32(0.02 * 4.5 / 448 / np.sqrt(k / 128))


class _Shards:
    """The demo checkpoint's writer: FP8 projections (put), one shard for the embeddings,
    final norm and lm_head, one per layer (filled by the builder's layer function), the
    index, and config.json last (a half-built directory is rebuilt)."""

    def __init__(self, directory: Path, cfg: dict, seed: int):
        self.directory, self.cfg = directory, cfg
        self.gen, self.rng = _Codes(seed), np.random.default_rng(seed + 1)

    def put(self, tensors: dict, dtypes: dict, name: str, shape: tuple[int, int]) -> None:
        codes, scale = self.gen.matrix(*shape)
        tensors[name], dtypes[name] = codes, "F8_E4M3"
        tensors[name + "_scale_inv"] = scale

    def write(self, layers: int, layer, progress=None, top=None) -> Path:
        """top(tensors, dtypes): more tensors for the shard of the embeddings."""
        h, vocab, weight_map = self.cfg["hidden_size"], self.cfg["vocab_size"], {}
        shards = [-1, *range(layers)]
        for i in progress(shards) if progress else shards:
            tensors: dict = {}
            dtypes: dict[str, str] = {}
            if i < 0:
                embed = self.rng.standard_normal((vocab, h)) * 0.5
                tensors["model.embed_tokens.weight"] = embed.astype(np.float32)
                one = 0.0 if self.cfg["model_type"] in QWEN_LINEAR else 1.0  # their 1 + w
                tensors["model.norm.weight"] = np.full(h, one, np.float32)
                self.put(tensors, dtypes, "lm_head.weight", (vocab, h))
                if top is not None:
                    top(tensors, dtypes)
                fname = "model-embed.safetensors"
            else:
                layer(i, tensors, dtypes)
                fname = f"model-layer{i:02d}.safetensors"
            save_file(tensors, self.directory / fname, dtypes)
            weight_map.update({name: fname for name in tensors})
        (self.directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        (self.directory / "config.json").write_text(json.dumps(self.cfg))
        return self.directory


class _FourBit:
    """Seeded routed-expert weights in a 4-bit format, as stored (refmoe/convert.py's tensor
    names), with the spread of _Codes' FP8 weights: codes drawn from a pool of encoded
    Gaussian samples, scales near the value that gives each matrix the same standard
    deviation."""

    def __init__(self, fmt: str, seed: int):
        self.fmt, self.rng = fmt, np.random.default_rng(seed)
        g = self.rng.standard_normal(2**17)
        if fmt == "int4g":
            codes = np.clip(np.rint(g * 2.5), -8, 7).astype(np.int64) + 8  # std ~2.5 steps
        else:
            codes = formats.e2m1_encode(g * 1.5).astype(np.int64)  # std ~1.5 of E2M1's range
        self.pool = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)  # two codes a byte
        self.spread = 2.5 if fmt == "int4g" else 1.5

    def put(self, tensors: dict, dtypes: dict, name: str, n: int, k: int) -> None:
        base = name[: -len(".weight")]
        std = 0.02 / np.sqrt(k / 128) / self.spread  # the scale that gives _Codes' spread
        packed = self.pool[self.rng.integers(0, len(self.pool), size=(n, k // 2))]
        if self.fmt == "mxfp4":
            e = np.clip(
                np.rint(np.log2(std)) + 127 + self.rng.integers(-1, 2, (n, k // 32)), 0, 254
            )
            tensors[f"{base}.weight_blocks"] = packed.reshape(n, k // 32, 16)
            tensors[f"{base}.weight_scales"] = e.astype(np.uint8)
            dtypes.update({f"{base}.weight_blocks": "U8", f"{base}.weight_scales": "U8"})
        elif self.fmt == "nvfp4":
            g = np.float32(std / 64)  # block scales near 64, mid-range of E4M3
            s = formats.fp8_encode(self.rng.uniform(32, 96, (n, k // 16)))
            tensors[f"{base}.weight"], dtypes[f"{base}.weight"] = packed, "U8"
            tensors[f"{base}.weight_scale"], dtypes[f"{base}.weight_scale"] = s, "F8_E4M3"
            tensors[f"{base}.weight_scale_2"] = np.array([g], np.float32)
        else:
            bits = formats.bf16_encode(
                (std * self.rng.uniform(0.5, 1.5, (n, k // 32))).astype(np.float32)
            )
            tensors[f"{base}.weight_packed"] = packed.view("<i4").astype(np.int32)
            tensors[f"{base}.weight_scale"], dtypes[f"{base}.weight_scale"] = bits, "BF16"
            tensors[f"{base}.weight_shape"] = np.array([n, k], np.int64)


def build(
    directory: Path,
    layers: int,
    experts: int,
    vocab: int = 8192,
    seed: int = 0,
    progress=None,
    expert_format: str = "fp8",
    family: str = "deepseek_v3",
    shape: dict | None = None,
) -> Path:
    """Write the demo checkpoint (one shard per layer) unless it is already there, and its
    tokenizer and chat template (refmoe/demo_tokenizer.py) unless they are. shape: as
    demo_config."""
    from refmoe import demo_tokenizer

    cfg = demo_config(layers, experts, vocab, expert_format, family, shape)
    four_bit = _FourBit(expert_format, seed + 2) if expert_format != "fp8" else None
    done = directory / "config.json"
    if done.exists() and json.loads(done.read_text()) == cfg:
        if not (directory / "tokenizer.json").exists():  # built before the demo had one
            demo_tokenizer.write(directory, vocab)
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    demo_tokenizer.write(directory, vocab)
    if family in GQA_LAYERS:
        return _build_gqa(directory, cfg, family, seed, progress)
    if family == "deepseek_v4":
        return _build_v4(directory, cfg, seed, progress)
    w = _Shards(directory, cfg, seed)
    h, c = cfg["hidden_size"], cfg
    n, qk = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]

    def layer(i: int, tensors: dict, dtypes: dict) -> None:
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        w.put(tensors, dtypes, f"{a}.q_a_proj.weight", (c["q_lora_rank"], h))
        w.put(tensors, dtypes, f"{a}.q_b_proj.weight", (n * qk, c["q_lora_rank"]))
        w.put(
            tensors,
            dtypes,
            f"{a}.kv_a_proj_with_mqa.weight",
            (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
        )
        w.put(
            tensors,
            dtypes,
            f"{a}.kv_b_proj.weight",
            (n * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
        )
        w.put(tensors, dtypes, f"{a}.o_proj.weight", (h, n * c["v_head_dim"]))
        if family == "deepseek_v32":  # the indexer: FP8 projections, a layer norm
            ih, idim = c["index_n_heads"], c["index_head_dim"]
            w.put(tensors, dtypes, f"{a}.indexer.wq_b.weight", (ih * idim, c["q_lora_rank"]))
            w.put(tensors, dtypes, f"{a}.indexer.wk.weight", (idim, h))
            w.put(tensors, dtypes, f"{a}.indexer.weights_proj.weight", (ih, h))
            tensors[f"{a}.indexer.k_norm.weight"] = np.ones(idim, np.float32)
            tensors[f"{a}.indexer.k_norm.bias"] = np.zeros(idim, np.float32)
        for norm, size in (
            (f"{a}.q_a_layernorm", c["q_lora_rank"]),
            (f"{a}.kv_a_layernorm", c["kv_lora_rank"]),
            (f"{p}.input_layernorm", h),
            (f"{p}.post_attention_layernorm", h),
        ):
            tensors[f"{norm}.weight"] = np.ones(size, np.float32)
        tensors[f"{p}.mlp.gate.weight"] = (w.rng.standard_normal((experts, h)) * 0.02).astype(
            np.float32
        )
        tensors[f"{p}.mlp.gate.e_score_correction_bias"] = np.zeros(experts, np.float32)
        inter = c["moe_intermediate_size"]
        for e in [f"experts.{j}" for j in range(experts)] + ["shared_experts"]:
            for proj, shape in (
                ("gate_proj", (inter, h)),
                ("up_proj", (inter, h)),
                ("down_proj", (h, inter)),
            ):
                name = f"{p}.mlp.{e}.{proj}.weight"
                if four_bit is not None and e != "shared_experts":
                    four_bit.put(tensors, dtypes, name, *shape)
                else:
                    w.put(tensors, dtypes, name, shape)

    return w.write(layers, layer, progress)


def _build_v4(directory: Path, cfg: dict, seed: int, progress) -> Path:
    """DeepSeek-V4's demo checkpoint under transformers' names: FP8 projections, float norms,
    sinks, compressor biases and hyper-connections, a hash table for the hash-routed layers,
    and the routed experts FP4 as released (E2M1 pairs in int8, E8M0 scales per 32)."""
    w, four = _Shards(directory, cfg, seed), _FourBit("mxfp4", seed + 2)
    c, h = cfg, cfg["hidden_size"]
    n, d, rank, experts = (
        c["num_attention_heads"],
        c["head_dim"],
        c["q_lora_rank"],
        c["n_routed_experts"],
    )
    g, lora, hc = c["o_groups"], c["o_lora_rank"], c["hc_mult"]
    inter, k = c["moe_intermediate_size"], c["num_experts_per_tok"]

    def layer(i: int, tensors: dict, dtypes: dict) -> None:
        p, kind = f"model.layers.{i}", c["layer_types"][i]
        a = f"{p}.self_attn"
        for name, shape in (
            ("q_a_proj", (rank, h)),
            ("q_b_proj", (n * d, rank)),
            ("kv_proj", (d, h)),
            ("o_a_proj", (g * lora, n * d // g)),
            ("o_b_proj", (h, g * lora)),
        ):
            w.put(tensors, dtypes, f"{a}.{name}.weight", shape)
        tensors[f"{a}.q_a_norm.weight"] = np.ones(rank, np.float32)
        tensors[f"{a}.kv_norm.weight"] = np.ones(d, np.float32)
        tensors[f"{a}.sinks"] = np.zeros(n, np.float32)
        rate = c["compress_rates"].get(kind, 0)
        csa = kind == "compressed_sparse_attention"
        parts = [(f"{a}.compressor", d, csa)]
        if csa:
            parts.append((f"{a}.compressor.indexer", c["index_head_dim"], True))
            ih = c["index_n_heads"] * c["index_head_dim"]
            w.put(tensors, dtypes, f"{a}.compressor.indexer.q_b_proj.weight", (ih, rank))
            w.put(
                tensors,
                dtypes,
                f"{a}.compressor.indexer.scorer.weights_proj.weight",
                (c["index_n_heads"], h),
            )
        for prefix, width, overlap in parts if rate else []:
            wide = (2 if overlap else 1) * width
            w.put(tensors, dtypes, f"{prefix}.kv_proj.weight", (wide, h))
            w.put(tensors, dtypes, f"{prefix}.gate_proj.weight", (wide, h))
            tensors[f"{prefix}.position_bias"] = np.zeros((rate, wide), np.float32)
            tensors[f"{prefix}.kv_norm.weight"] = np.ones(width, np.float32)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{norm}.weight"] = np.ones(h, np.float32)
        for mix in ("attn_hc", "ffn_hc"):
            tensors[f"{p}.{mix}.fn"] = (
                w.rng.standard_normal(((2 + hc) * hc, hc * h)) * 0.01
            ).astype(np.float32)
            tensors[f"{p}.{mix}.base"] = np.zeros((2 + hc) * hc, np.float32)
            tensors[f"{p}.{mix}.scale"] = np.ones(3, np.float32)
        m = f"{p}.mlp"
        tensors[f"{m}.gate.weight"] = (w.rng.standard_normal((experts, h)) * 0.02).astype(
            np.float32
        )
        if c["mlp_layer_types"][i] == "hash_moe":
            tensors[f"{m}.gate.tid2eid"] = np.stack(
                [w.rng.permutation(experts)[:k] for _ in range(c["vocab_size"])]
            ).astype(np.int64)
        else:
            tensors[f"{m}.gate.e_score_correction_bias"] = np.zeros(experts, np.float32)
        projections = (
            ("gate_proj", (inter, h)),
            ("up_proj", (inter, h)),
            ("down_proj", (h, inter)),
        )
        for e in range(experts):  # FP4 as released: the MXFP4 bytes in int8, E8M0 scales
            for proj, (rows, cols) in projections:
                base = f"{m}.experts.{e}.{proj}"
                held: dict = {}
                four.put(held, {}, f"{base}.weight", rows, cols)
                tensors[f"{base}.weight"] = (
                    held[f"{base}.weight_blocks"].reshape(rows, -1).view(np.int8)
                )
                dtypes[f"{base}.weight"] = "I8"
                tensors[f"{base}.weight_scale_inv"] = held[f"{base}.weight_scales"]
                dtypes[f"{base}.weight_scale_inv"] = "F8_E8M0"
        for proj, shape in projections:
            w.put(tensors, dtypes, f"{m}.shared_experts.{proj}.weight", shape)

    def top(tensors: dict, dtypes: dict) -> None:  # the final hyper-connection head
        tensors["model.hc_head.hc_fn"] = (w.rng.standard_normal((hc, hc * h)) * 0.01).astype(
            np.float32
        )
        tensors["model.hc_head.hc_base"] = np.zeros(hc, np.float32)
        tensors["model.hc_head.hc_scale"] = np.ones(1, np.float32)

    return w.write(c["num_hidden_layers"], layer, progress, top)


def _build_gqa(directory: Path, cfg: dict, family: str, seed: int, progress) -> Path:
    """The GQA families' demo checkpoint, under each family's tensor names (see
    refmoe/models/experts.MoENames): FP8 projections, float norms, biases, sinks and routers;
    gpt-oss's experts fused in MXFP4 as released, the others' per expert in FP8."""
    w, four = _Shards(directory, cfg, seed), _FourBit("mxfp4", seed + 2)
    h, n, g, d = (
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    layers = cfg["num_hidden_layers"]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    oss, minimax, qwen = family == "gpt_oss", family == "minimax_m2", family in QWEN_LINEAR
    qwen3, plain = family == "qwen3_moe", family == "qwen3_5_moe"
    offset = 0.0 if qwen else 1.0  # Qwen3-Next's norms scale by 1 + the stored weight

    put = w.put

    def small(*shape):
        return (w.rng.standard_normal(shape) * 0.02).astype(np.float32)

    def linear_attention(p: str, tensors: dict, dtypes: dict) -> None:
        """Qwen3-Next's Gated DeltaNet: FP8 projections (b and a as floats: 2 rows a value
        head), its convolution, decays and norm as floats. Qwen3.5's stores the input
        projection as four matrices (qkv and z FP8, b and a floats), as its FP8 release does."""
        hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
        dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
        channels = 2 * hk * dk + hv * dv
        if plain:
            put(tensors, dtypes, f"{p}.in_proj_qkv.weight", (channels, h))
            put(tensors, dtypes, f"{p}.in_proj_z.weight", (hv * dv, h))
            tensors[f"{p}.in_proj_b.weight"] = small(hv, h)
            tensors[f"{p}.in_proj_a.weight"] = small(hv, h)
        else:
            put(tensors, dtypes, f"{p}.in_proj_qkvz.weight", (channels + hv * dv, h))
            tensors[f"{p}.in_proj_ba.weight"] = small(2 * hv, h)
        conv = w.rng.standard_normal((channels, 1, cfg["linear_conv_kernel_dim"])) * 0.5
        tensors[f"{p}.conv1d.weight"] = conv.astype(np.float32)
        tensors[f"{p}.dt_bias"] = np.ones(hv, np.float32)
        tensors[f"{p}.A_log"] = np.log(w.rng.uniform(1, 16, hv)).astype(np.float32)
        tensors[f"{p}.norm.weight"] = np.ones(dv, np.float32)
        put(tensors, dtypes, f"{p}.out_proj.weight", (h, hv * dv))

    def layer(i: int, tensors: dict, dtypes: dict) -> None:
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{norm}.weight"] = np.full(h, offset, np.float32)
        if qwen:
            _qwen3_next_moe(f"{p}.mlp", tensors, dtypes)
            if cfg["layer_types"][i] == "linear_attention":
                linear_attention(f"{p}.linear_attn", tensors, dtypes)
                return
            put(tensors, dtypes, f"{a}.q_proj.weight", (2 * n * d, h))  # each head's gate too
            put(tensors, dtypes, f"{a}.k_proj.weight", (g * d, h))
            put(tensors, dtypes, f"{a}.v_proj.weight", (g * d, h))
            put(tensors, dtypes, f"{a}.o_proj.weight", (h, n * d))
            tensors[f"{a}.q_norm.weight"] = np.zeros(d, np.float32)
            tensors[f"{a}.k_norm.weight"] = np.zeros(d, np.float32)
            return
        for proj, shape in (("q", (n * d, h)), ("k", (g * d, h)), ("v", (g * d, h))):
            put(tensors, dtypes, f"{a}.{proj}_proj.weight", shape)
            if cfg.get("attention_bias"):
                tensors[f"{a}.{proj}_proj.bias"] = small(shape[0])
        put(tensors, dtypes, f"{a}.o_proj.weight", (h, n * d))
        if oss:
            tensors[f"{a}.o_proj.bias"], tensors[f"{a}.sinks"] = small(h), small(n)
        if minimax:  # q/k norms over all heads at once
            tensors[f"{a}.q_norm.weight"] = np.ones(n * d, np.float32)
            tensors[f"{a}.k_norm.weight"] = np.ones(g * d, np.float32)
        if qwen3:  # per head
            tensors[f"{a}.q_norm.weight"] = np.ones(d, np.float32)
            tensors[f"{a}.k_norm.weight"] = np.ones(d, np.float32)
        m = f"{p}.block_sparse_moe" if minimax else f"{p}.mlp"
        router = f"{m}.router" if oss else f"{m}.gate"
        tensors[f"{router}.weight"] = small(experts, h)
        if oss:
            tensors[f"{router}.bias"] = small(experts)
        elif not qwen3:  # Qwen3's softmax router has no correction bias
            bias = (
                f"{m}.e_score_correction_bias" if minimax else f"{m}.gate.e_score_correction_bias"
            )
            tensors[bias] = np.zeros(experts, np.float32)
        if oss:  # fused MXFP4, gate and up interleaved by rows
            for proj, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
                blocks, scales = [], []
                for _ in range(experts):
                    one: dict = {}
                    four.put(one, {}, "x.weight", rows, cols)
                    blocks.append(one["x.weight_blocks"])
                    scales.append(one["x.weight_scales"])
                name = f"{m}.experts.{proj}"
                tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = (
                    np.stack(blocks),
                    np.stack(scales),
                )
                dtypes.update({f"{name}_blocks": "U8", f"{name}_scales": "U8"})
                tensors[f"{name}_bias"] = small(experts, rows)
        else:
            names = ("w1", "w3", "w2") if minimax else ("gate_proj", "up_proj", "down_proj")
            slots = [f"experts.{e}" for e in range(experts)]
            slots += ["shared_experts"] if cfg.get("n_shared_experts") else []
            for slot in slots:
                for proj, shape in zip(names, ((inter, h), (inter, h), (h, inter))):
                    put(tensors, dtypes, f"{m}.{slot}.{proj}.weight", shape)

    def _qwen3_next_moe(m: str, tensors: dict, dtypes: dict) -> None:
        """A softmax router, FP8 experts, one shared expert and its per-token gate."""
        tensors[f"{m}.gate.weight"] = small(experts, h)
        tensors[f"{m}.shared_expert_gate.weight"] = small(1, h)
        for slot in [f"experts.{e}" for e in range(experts)] + ["shared_expert"]:
            for proj, shape in zip(
                ("gate_proj", "up_proj", "down_proj"), ((inter, h), (inter, h), (h, inter))
            ):
                put(tensors, dtypes, f"{m}.{slot}.{proj}.weight", shape)

    return w.write(layers, layer, progress)


def default_dir() -> Path:
    base = Path(os.environ.get("REFMOE_CACHE", Path.home() / ".cache" / "refmoe"))
    return base / "demo"


def bytes_per_token(model) -> int:
    """Weight bytes one decoded token reads: every projection, the experts it is routed to
    (top-k plus the shared one), and lm_head."""

    cfg, total = model.cfg, 0
    for block in model.blocks:
        # every projection of the attention block, whatever its kind (MLA, GQA, a linear
        # layer's in/out projections), and its parts' (DSA's indexer, V4's compressors)
        total += sum(linear.nbytes for linear in _linears(block.attn))
        ffn = block.ffn
        if hasattr(ffn, "experts"):
            total += (cfg.num_experts_per_tok + ffn.fused_shared) * ffn.experts.nbytes(0)
            if ffn.shared is not None:
                total += sum(m.nbytes for m in (ffn.shared.gate, ffn.shared.up, ffn.shared.down))
        else:
            total += sum(m.nbytes for m in (ffn.gate, ffn.up, ffn.down))
    return total + (model.head.nbytes if model.head is not None else model.embed.nbytes)


def _linears(part, seen=None) -> list:
    """The projections (layers.Linear) of a model part and of the refmoe.models objects it
    holds, each once."""
    from refmoe.models.layers import Linear

    seen = set() if seen is None else seen
    found = []
    for value in vars(part).values() if hasattr(part, "__dict__") else []:
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, Linear):
            found.append(value)
        elif type(value).__module__.startswith("refmoe.models"):
            found += _linears(value, seen)
    return found


def cpu_bytes_per_token(model) -> int:
    """The part of bytes_per_token that the CPU reads: all of it when the model runs on the CPU;
    with attention and dense layers on a GPU (hybrid decode), only the routed experts (and the
    shared expert fused into their call, or beside it)."""
    if model.device.type == "cpu":
        return bytes_per_token(model)
    cfg, total = model.cfg, 0
    for block in model.blocks:
        ffn = block.ffn
        if hasattr(ffn, "experts"):
            total += (cfg.num_experts_per_tok + ffn.fused_shared) * ffn.experts.nbytes(0)
    return total


def describe(cfg) -> str:
    """The demo model's shapes in a line, from its config (a ModelConfig): family, width,
    attention, experts."""
    types = cfg.layer_types or ["full_attention"] * cfg.num_hidden_layers
    if cfg.kv_lora_rank:
        attention = "MLA" + (" + DSA indexer" if cfg.family == "deepseek_v32" else "")
    elif cfg.family == "deepseek_v4":
        csa, hca = (
            types.count("compressed_sparse_attention"),
            types.count("heavily_compressed_attention"),
        )
        attention = (
            f"{cfg.num_attention_heads} heads on one KV head of {cfg.head_dim}, a "
            f"{cfg.sliding_window}-token window, {csa} CSA + {hca} HCA layers, "
            f"{cfg.hc_mult} residual streams"
        )
    elif "linear_attention" in types:
        attention = (
            f"{types.count('linear_attention')} Gated DeltaNet + "
            f"{types.count('full_attention')} gated full-attention layers"
        )
    else:
        attention = f"GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads"
    shared = cfg.n_shared_experts + bool(cfg.shared_expert_intermediate_size)
    fmt = cfg.expert_format[0]
    return (
        f"{cfg.family} per-layer shapes (hidden {cfg.hidden_size}, {attention}, "
        f"{cfg.moe_intermediate_size}-wide {fmt.upper()} experts, top-{cfg.num_experts_per_tok} "
        f"of {cfg.n_routed_experts}" + (f" + {shared} shared" if shared else "") + ")"
    )


def read_samples(nbytes: int = 512 * 2**20, reps: int = 3) -> list[float]:
    """Plain read bandwidth of the kernel threads over a buffer larger than any cache, GB/s,
    one figure per pass (after one warm-up pass)."""
    buf = np.ones(nbytes, np.uint8)
    kernels.read_bandwidth_probe(buf)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        kernels.read_bandwidth_probe(buf)
        out.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return out


def read_gbps(nbytes: int = 512 * 2**20, reps: int = 3) -> float:
    """The median of read_samples."""
    return statistics.median(read_samples(nbytes, reps))


@dataclass(slots=True)
class DecodeReport:
    layers: int
    experts: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    tok_s: float
    bytes_per_token: int
    read_gbps: float
    cpu_bytes_per_token: int = 0  # what the CPU reads of it (all of it unless hybrid)
    device: str = "cpu"
    # the read measured just before and just after the decode (read_gbps: the median of both
    # sets), so a bound taken on one side of a change of the machine's pace shows as a gap
    read_before_gbps: float = 0.0
    read_after_gbps: float = 0.0

    @property
    def bound_tok_s(self) -> float:
        """The CPU's read bound: the bytes the CPU reads per token at the measured read."""
        return self.read_gbps * 1e9 / (self.cpu_bytes_per_token or self.bytes_per_token)

    @property
    def ratio(self) -> float:
        return self.tok_s / self.bound_tok_s


def run(
    directory: Path,
    prompt_tokens: int = 16,
    new_tokens: int = 16,
    seed: int = 0,
    progress=None,
    trace=None,
    device: str = "cpu",
) -> DecodeReport:
    """Load the demo model, prefill a seeded prompt, decode greedily; measure the read limit
    with the same threads just before and just after the decode. trace: a refmoe.trace.Trace
    for the measured request. device: where attention and dense layers run (cuda: hybrid decode)."""
    from refmoe import models
    from refmoe.generate import generate

    cfg, model = models.load(directory, progress=progress, device=device)
    prompt = np.random.default_rng(seed).integers(2, cfg.vocab_size, prompt_tokens).tolist()
    generate(model, prompt[:4], 2)  # warm-up: pages, thread pool
    before = read_samples()
    g = generate(model, prompt, new_tokens, trace=trace)
    after = read_samples()
    steps = sorted(g.step_s)
    tok_s = 1.0 / steps[len(steps) // 2] if steps else 0.0
    return DecodeReport(
        cfg.num_hidden_layers,
        cfg.n_routed_experts,
        prompt_tokens,
        len(g.token_ids),
        g.ttft_s,
        tok_s,
        bytes_per_token(model),
        statistics.median(before + after),
        cpu_bytes_per_token(model),
        str(model.device),
        statistics.median(before),
        statistics.median(after),
    )


def _fill(layer, cfg, context: int, gen) -> None:
    """One layer's cache as if `context` tokens had run: synthetic entries of its kind (MLA's
    latents and DSA's indexer keys, GQA's keys and values, a sliding layer's last window) or,
    for a linear-attention layer, a random state that has seen that many tokens."""
    import torch

    from refmoe.models import deepseek_v4, deepseek_v32, gqa, qwen3_next

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    if isinstance(layer, deepseek_v4.LayerCache):  # window, open windows, closed entries
        window, *projections = layer.now()  # empty, each as wide as the layer keeps it
        tail = context - layer.tail_start(context)
        open_ = [rand(tail, p.shape[1]) for p in projections]
        layer.set(context, rand(min(context, layer.keep), window.shape[1]), *open_)
        for grown, width in ((layer.entries, cfg.head_dim), (layer.index_keys, cfg.index_head_dim)):
            if grown is not None:
                grown.append(rand(context // layer.rate, width))
    elif isinstance(layer, qwen3_next.LinearCache):
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        channels = 2 * hk * dk + hv * dv
        layer.set(context, rand(channels, cfg.linear_conv_kernel_dim - 1), rand(hv, dk, dv))
    elif isinstance(layer, gqa.WindowCache):  # a sliding layer: its last window only
        g, d, held = cfg.num_key_value_heads, cfg.head_dim, min(context, layer.keep)
        layer.set(context, rand(g, held, d), rand(g, held, d))
    elif isinstance(layer, gqa.LayerCache):
        g, d = cfg.num_key_value_heads, cfg.head_dim
        layer.k.append(rand(g, context, d))
        layer.v.append(rand(g, context, d))
    else:  # MLA's latents (and DSA's indexer keys)
        layer.kv.append(rand(context, cfg.kv_lora_rank + cfg.qk_rope_head_dim))
        if isinstance(layer, deepseek_v32.LayerCache):
            layer.keys.append(rand(context, cfg.index_head_dim))


def decode_at_contexts(directory: Path, contexts: list[int], steps: int = 5) -> list[dict]:
    """Decode steps of the demo model after `contexts` cached tokens each: every layer's cache
    is filled with synthetic entries (_fill: what a step costs depends on how many there are,
    not on their values), then `steps` single-token
    steps are timed (median, min, max). A DeepSeek-V3.2 model is measured twice: with its
    indexer (sparse), and with index_topk past every context (dense MLA, what V3 does)."""
    import torch

    from refmoe import models

    if any(c < 1 for c in contexts) or steps < 1:
        raise ValueError(f"contexts and steps must be positive, got {contexts}, {steps}")
    cfg, model = models.load(directory)
    modes = ["sparse", "dense"] if cfg.is_dsa else ["dense"]
    topk = cfg.index_topk
    kind = "mla" if cfg.kv_lora_rank else ("v4" if cfg.family == "deepseek_v4" else "gqa")
    if "linear_attention" in (cfg.layer_types or []):
        kind += " + linear"
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for mode in modes:
        cfg.index_topk = topk if mode == "sparse" else 1 << 40
        first = None
        for context in contexts:
            cache = model.new_cache()
            for layer in cache.layers:
                _fill(layer, cfg, context, gen)
            model.forward(torch.tensor([5]), cache)  # warm-up
            times = []
            for i in range(steps):
                start = time.perf_counter()
                model.forward(torch.tensor([7 + i]), cache)
                times.append(time.perf_counter() - start)
            times.sort()
            ms = 1e3 * times[len(times) // 2]
            first = first or ms
            rows.append(
                {
                    "op": "decode_at_context",
                    "model": f"demo-{cfg.family}-L{cfg.num_hidden_layers}-E{cfg.n_routed_experts}",
                    "attention": mode if cfg.is_dsa else kind,
                    "context": context,
                    "step_ms": ms,
                    "step_ms_min": 1e3 * times[0],
                    "step_ms_max": 1e3 * times[-1],
                    "over_first": ms / first,
                    "cache_bytes": cache.nbytes(),
                    "threads": kernels._threads(None),
                }
            )
    cfg.index_topk = topk
    return rows
