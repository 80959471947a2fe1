"""ModelConfig: the fields refmoe needs from a Hugging Face config.json, validated.

Field names are Hugging Face's (`n_routed_experts`, `topk_group`, `kv_lora_rank`, ...). One
dataclass serves every family; `architecture` says which model file runs it (`family`), and the
GQA families' differences are fields here (q/k norms, partial rotary, biases, sinks, sliding
windows, the router's kind, the expert activation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from refmoe.kernels import formats

ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",  # DeepSeek-V3/R1/V3.1, Kimi-K2, Moonlight
    "DeepseekV2ForCausalLM": "deepseek_v3",  # same MLA/MoE layout (noaux_tc needs V3 gating)
    "DeepseekV32ForCausalLM": "deepseek_v32",  # DeepSeek-V3.2(-Exp): V3 + DSA's indexer
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",  # GLM-5: DSA with layers sharing a selection
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Glm4MoeForCausalLM": "glm4_moe",  # GLM-4.5 / 4.6 / 4.7 (and -Air)
    "MiniMaxM2ForCausalLM": "minimax_m2",  # MiniMax-M2 / M2.x
    "GptOssForCausalLM": "gpt_oss",  # gpt-oss-20b / 120b
    "Qwen3NextForCausalLM": "qwen3_next",  # Qwen3-Next: Gated DeltaNet + gated attention
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",  # Qwen3.5 / 3.6 MoE: Qwen3-Next's layers
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",  # as released: text under text_config
    "DeepseekV4ForCausalLM": "deepseek_v4",  # DeepSeek-V4(-Flash/-Pro): CSA/HCA, mHC, hash MoE
}
TEXT_CONFIG_FAMILIES = ("qwen3_5_moe",)  # released with a vision tower: text_config is the model
ALIASES = {  # the same field under the names other releases of transformers write
    "num_experts": ("num_local_experts",),
    "n_routed_experts": ("num_local_experts",),
    "num_experts_per_tok": ("experts_per_token",),  # gpt-oss's original config
}
MODEL_TYPES = {  # when config.json has no architectures list
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "glm_moe_dsa": "GlmMoeDsaForCausalLM",
    "kimi_k2": "DeepseekV3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "minimax_m2": "MiniMaxM2ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "deepseek_v4": "DeepseekV4ForCausalLM",
}
MLA_FAMILIES = ("deepseek_v3", "deepseek_v32", "glm_moe_dsa")
DSA_FAMILIES = ("deepseek_v32", "glm_moe_dsa")
QK_NORMS = ("head", "all", "none")  # per head (Qwen3, GLM), over all heads at once (MiniMax)
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
# DeepSeek-V4's attention kinds: a sliding window alone, or beside compressed entries of every
# compress_rates[kind] tokens (CSA: chosen per query by an indexer; HCA: all of them)
V4_LAYER_TYPES = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # one routed expert
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # the router: sigmoid (DeepSeek-V3, GLM, MiniMax: with a correction bias for the choice),
    # softmax (Qwen3: over every expert, then top-k), softmax_topk (gpt-oss: top-k of the
    # logits, softmax over those k)
    scoring_func: str = "sigmoid"
    router_bias: bool = False  # gpt-oss: the router's linear has a bias
    # the experts: silu(gate) * up, or gpt-oss's clamped SwiGLU with biases on every projection
    hidden_act: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    # attention (MLA for DeepSeek, GQA with q/k norms for Qwen3)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    head_dim: int = 0
    qk_norm: str = "head"  # GQA: QK_NORMS
    partial_rotary_factor: float = 1.0  # GQA: rope on the first head_dim * this dims
    attention_bias: bool = False  # GQA: q/k/v biases
    attention_out_bias: bool = False  # GQA: o_proj bias (gpt-oss)
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in every softmax
    sliding_window: int = 0
    layer_types: list[str] = field(default_factory=list)  # per layer, LAYER_TYPES; [] = full
    attention_output_gate: bool = False  # Qwen3-Next: o_proj(attn * sigmoid(gate from q_proj))
    norm_offset: bool = False  # Qwen3-Next: every RMSNorm scales by (1 + weight)
    # Gated DeltaNet (linear_attention layers, Qwen3-Next): heads and widths, conv kernel
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen3-Next: one shared expert, sigmoid-gated
    rope_interleave: bool = True
    # DSA (DeepSeek-V3.2): the lightning indexer's heads and width; each query attends to the
    # index_topk cached tokens it scores highest
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    indexer_types: list[str] = field(default_factory=list)  # per layer full | shared; [] = full
    index_rope_interleave: bool = False  # GLM-5 ropes the indexer interleaved, V3.2 half-split
    # DeepSeek-V4: compressed attention (compress_rates per layer type, their own rope base and
    # scaling), hc_mult residual streams mixed per layer (mHC, Sinkhorn iterations), hash-routed
    # first MoE layers (mlp_layer_types hash_moe / moe), a grouped output projection
    compress_rates: dict = field(default_factory=dict)
    compress_rope_theta: float = 0.0
    compress_rope_scaling: dict | None = None
    hc_mult: int = 0
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] = field(default_factory=list)
    o_groups: int = 0
    o_lora_rank: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    quantization: dict | None = None  # config.json quantization_config

    @property
    def is_fp8(self) -> bool:
        """FP8 weights: DeepSeek's quant_method fp8 or compressed-tensors float-quantized."""
        return fp8_block(self.quantization, "quantization_config") is not None

    @property
    def fp8_block(self) -> tuple[int, int]:
        """The block one FP8 scale covers, in the kernels' terms (formats.WHOLE spans the
        dimension): weight_block_size (128 x 128 where the config names none), or
        compressed-tensors' block_structure, channel (1, WHOLE) or tensor (WHOLE, WHOLE)."""
        return fp8_scheme(self.quantization)[0]

    @property
    def fp8_block_default(self) -> bool:
        """An FP8 config that names no block (a lone stored scale is then per tensor)."""
        return fp8_scheme(self.quantization)[1]

    @property
    def expert_format(self) -> tuple[str, int]:
        """(format, group size) the routed experts are stored in, from quantization_config:
        fp8 (128x128 blocks), mxfp4, nvfp4 (ModelOpt), int4g (compressed-tensors
        pack-quantized), or bf16 where there is none (float checkpoints)."""
        return expert_format(self.quantization, "quantization_config")

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (the DeepSeek-V3 families); else GQA."""
        return self.family in MLA_FAMILIES

    @property
    def is_dsa(self) -> bool:
        """DeepSeek Sparse Attention: MLA with the lightning indexer (V3.2, GLM-5)."""
        return self.family in DSA_FAMILIES

    @property
    def rotary_dim(self) -> int:
        """GQA: the leading dims of each head that rope turns (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int:
        """The sliding window layer `layer` attends within, or 0 for full attention."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return 0

    def _v4_checks(self) -> list[tuple[bool, str]]:
        n, types = self.num_hidden_layers, self.layer_types
        csa = "compressed_sparse_attention" in types
        rates = [self.compress_rates.get(t, 0) for t in V4_LAYER_TYPES[1:]]
        return [
            (self.num_key_value_heads == 1, "num_key_value_heads: DeepSeek-V4 shares one KV head"),
            (len(types) == n, "layer_types must name one type per layer (num_hidden_layers)"),
            (
                all(isinstance(r, int) and r > 0 for r in rates),
                "compress_rates: a positive integer per compressed layer type",
            ),
            (self.sliding_window > 0, "sliding_window must be positive"),
            (
                self.hc_mult >= 1 and self.hc_sinkhorn_iters >= 1,
                "hc_mult and hc_sinkhorn_iters >= 1",
            ),
            (
                len(self.mlp_layer_types) == n
                and all(t in ("hash_moe", "moe") for t in self.mlp_layer_types),
                "mlp_layer_types: hash_moe or moe per layer (num_hidden_layers)",
            ),
            (
                self.o_groups > 0
                and self.o_lora_rank > 0
                and self.num_attention_heads % self.o_groups == 0,
                "o_groups must divide num_attention_heads; o_groups and o_lora_rank positive",
            ),
            (
                not csa or min(self.index_n_heads, self.index_head_dim, self.index_topk) > 0,
                "index_n_heads, index_head_dim and index_topk must be positive with "
                "compressed_sparse_attention layers",
            ),
            (
                not csa or self.rotary_dim <= self.index_head_dim,
                "index_head_dim must hold the rotary dims (the indexer ropes its last ones)",
            ),
            (self.compress_rope_theta > 0, "compress_rope_theta must be positive"),
        ]

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """Build and validate; every error names the source and the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: must be a JSON object, got {type(d).__name__}")
        get = _Fields(d, source)
        archs = get("architectures", list, [])
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        model_type = get("model_type", str, None)
        if arch is None and not archs:
            arch = MODEL_TYPES.get(model_type)
        if arch is None:
            raise ValueError(
                f"{source}: unknown architecture {archs or model_type!r}; "
                f"refmoe runs {sorted(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[arch]
        if family in TEXT_CONFIG_FAMILIES and "text_config" in d:
            # the language model's fields, over the release's top level (quantization_config
            # and tie_word_embeddings may sit there); the vision tower is not loaded
            text = get("text_config", dict)
            outer = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
            return cls.from_dict(outer | text | {"architectures": [arch]}, f"{source} text_config")
        need = get.need

        rope = get("rope_parameters", dict, {})
        scaling = get("rope_scaling", dict, None) or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        eos = d.get("eos_token_id")
        if eos is not None and not (
            _is_int(eos) or isinstance(eos, list) and all(_is_int(e) for e in eos)
        ):
            raise ValueError(
                f"{source}: field 'eos_token_id' must be an integer or a list of "
                f"integers, got {eos!r}"
            )
        heads = need("num_attention_heads")
        common = dict(
            architecture=arch,
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", int, None) or heads,
            rope_theta=get("rope_theta", float, None) or float(rope.get("rope_theta") or 1e4),
            rope_scaling=scaling,
            max_position_embeddings=get("max_position_embeddings", int, 4096),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            bos_token_id=get("bos_token_id", int, None),
            eos_token_id=[] if eos is None else ([eos] if _is_int(eos) else list(eos)),
            quantization=_quantization(get),
        )
        if family == "deepseek_v4":
            cfg = cls(**(common | _v4_fields(get, source)))
            cfg.validate(source)
            return cfg
        if family in MLA_FAMILIES:
            mla = _noaux_tc_fields(get) | dict(
                intermediate_size=need("intermediate_size"),
                num_experts_per_tok=need("num_experts_per_tok"),
                scoring_func=get("scoring_func", str, "sigmoid"),
                q_lora_rank=get("q_lora_rank", int, None),
                kv_lora_rank=need("kv_lora_rank"),
                qk_nope_head_dim=need("qk_nope_head_dim"),
                qk_rope_head_dim=need("qk_rope_head_dim"),
                v_head_dim=need("v_head_dim"),
                rope_interleave=get("rope_interleave", bool, True),
            )
            if family in DSA_FAMILIES:
                mla |= _dsa_fields(family, get, source)
            cfg = cls(**common, **mla)
        else:
            cfg = cls(**common, **_gqa_fields(family, get, heads, common["hidden_size"], source))
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config.json") -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"{source}: field {f.name!r} must be >= 0, got {v}")
        sizes = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
        ]
        sizes += (
            ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
            if self.is_mla
            else ["head_dim"]
        )
        if self.first_k_dense_replace > 0:
            sizes.append("intermediate_size")
        if self.is_dsa:
            sizes += ["index_n_heads", "index_head_dim", "index_topk", "q_lora_rank"]
        for name in sizes:  # a zero size is the config's fault, not a tensor's
            if (getattr(self, name) or 0) <= 0:
                raise ValueError(
                    f"{source}: field {name!r} must be positive, got {getattr(self, name)}"
                )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(
                f"{source}: field 'q_lora_rank' must be positive or null, got {self.q_lora_rank}"
            )
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"{source}: rms_norm_eps and rope_theta must be positive")
        checks = [
            (
                self.num_attention_heads % max(self.num_key_value_heads, 1) == 0,
                "num_attention_heads must be a multiple of num_key_value_heads",
            ),
            (
                0 < self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok must lie in [1, n_routed_experts]",
            ),
            (
                self.n_routed_experts % self.n_group == 0,
                "n_routed_experts must be a multiple of n_group",
            ),
            (1 <= self.topk_group <= self.n_group, "topk_group must lie in [1, n_group]"),
            (
                self.scoring_func in ("sigmoid", "softmax", "softmax_topk", "sqrtsoftplus"),
                "scoring_func must be sigmoid, softmax, softmax_topk or sqrtsoftplus",
            ),
            (self.hidden_act in ("silu", "swiglu_oai", "silu_clamp"), "hidden_act must be silu"),
            (self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}"),
            (
                self.is_mla or 0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
                "partial_rotary_factor (rotary_dim) must give an even number of rotary dims "
                "in (0, head_dim]",
            ),
            (
                not self.layer_types or len(self.layer_types) == self.num_hidden_layers,
                "layer_types must name one type per layer (num_hidden_layers)",
            ),
            (
                all(
                    t in (V4_LAYER_TYPES if self.family == "deepseek_v4" else LAYER_TYPES)
                    for t in self.layer_types
                ),
                "layer_types: each one of "
                f"{V4_LAYER_TYPES if self.family == 'deepseek_v4' else LAYER_TYPES}",
            ),
            (
                "sliding_attention" not in self.layer_types or self.sliding_window > 0,
                "sliding_window must be positive where layer_types has sliding_attention",
            ),
            (
                "linear_attention" not in self.layer_types
                or min(
                    self.linear_num_key_heads,
                    self.linear_key_head_dim,
                    self.linear_value_head_dim,
                    self.linear_conv_kernel_dim,
                )
                > 0
                and self.linear_num_value_heads % max(self.linear_num_key_heads, 1) == 0
                and self.linear_num_value_heads > 0,
                "linear_attention layers need positive linear_* sizes, linear_num_value_heads "
                "a multiple of linear_num_key_heads",
            ),
            (
                not self.is_mla or self.qk_rope_head_dim % 2 == 0,
                "qk_rope_head_dim must be even",
            ),
            (
                not self.is_dsa or self.qk_rope_head_dim <= self.index_head_dim,
                "index_head_dim must hold qk_rope_head_dim (the indexer ropes its first dims)",
            ),
            (
                not self.indexer_types
                or len(self.indexer_types) == self.num_hidden_layers
                and set(self.indexer_types) <= {"full", "shared"}
                and self.indexer_types[0] == "full",
                "indexer_types: full or shared per layer (num_hidden_layers), the first full",
            ),
        ]
        if self.is_mla and self.n_group > 1:
            per_group = self.n_routed_experts // self.n_group
            checks.append((per_group >= 2, "each expert group needs >= 2 experts (top-2 sum)"))
            checks.append(
                (
                    self.topk_group * per_group >= self.num_experts_per_tok,
                    "topk_group groups must hold at least num_experts_per_tok experts",
                )
            )
        if self.family == "deepseek_v4":
            checks += self._v4_checks()
        q = self.quantization
        if q is not None and q.get("quant_method") == "fp8":
            if q.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
                raise ValueError(
                    f"{source}: quantization_config.fmt: refmoe reads e4m3, got {q.get('fmt')!r}"
                )
            if q.get("scale_fmt", "ue8m0") not in ("ue8m0", "fp32", "float32"):
                raise ValueError(
                    f"{source}: quantization_config.scale_fmt: ue8m0 or float32, got "
                    f"{q.get('scale_fmt')!r}"
                )
        try:
            expert_format(q, "quantization_config")
            fp8_block(q, "quantization_config")
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{source}: {message}")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: not found (a model directory needs config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:  # a symlink loop, a directory, no permission
            raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
        cfg = cls.from_dict(d, str(path))
        # generation_config.json's end tokens end a reply too (gpt-oss ends a tool call with
        # <|call|>, listed there and not in config.json), as transformers' generate reads them
        for eos in _generation_eos(path.parent / "generation_config.json"):
            if eos not in cfg.eos_token_id:
                cfg.eos_token_id.append(eos)
        return cfg


def _generation_eos(path: Path) -> list[int]:
    """The eos_token_id of a generation_config.json (an integer or a list), [] where there is
    no such file or field; anything else is refused naming the file and the field."""
    if not path.exists():
        return []
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    eos = d.get("eos_token_id") if isinstance(d, dict) else None
    if eos is None:
        return []
    if _is_int(eos):
        return [eos]
    if isinstance(eos, list) and all(_is_int(e) for e in eos):
        return list(eos)
    raise ValueError(
        f"{path}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}"
    )


def _noaux_tc_fields(get: _Fields) -> dict:
    """DeepSeek-V3's MoE block as its config names it (V3, V3.2, GLM-4.5, GLM-5): routed and
    shared experts, dense first layers, the group-limited router and its scaling."""
    return dict(
        moe_intermediate_size=get.need("moe_intermediate_size"),
        n_routed_experts=get.need("n_routed_experts"),
        n_shared_experts=get("n_shared_experts", int, None) or 0,
        first_k_dense_replace=get("first_k_dense_replace", int, None) or 0,
        n_group=get("n_group", int, None) or 1,
        topk_group=get("topk_group", int, None) or 1,
        norm_topk_prob=get("norm_topk_prob", bool, True),
        routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
    )


def _quantization(get: _Fields) -> dict | None:
    """quantization_config, with DeepSeek-V4's top-level expert_dtype folded in (V4.1 writes it
    inside, as transformers reads both)."""
    q = get("quantization_config", dict, None)
    expert_dtype = get("expert_dtype", str, None)
    if q is not None and expert_dtype is not None and "expert_dtype" not in q:
        q = q | {"expert_dtype": expert_dtype}
    return q


def _v4_fields(get: _Fields, source: str) -> dict:
    """DeepSeek-V4's fields, under the names its release writes (compress_ratios per layer,
    num_hash_layers, qk_rope_head_dim, a flat rope_scaling) or transformers' (layer_types,
    compress_rates, mlp_layer_types, partial_rotary_factor, rope_parameters main/compress):
    the sliding-only layers rope with rope_theta unscaled, the compressed ones with
    compress_rope_theta and the scaling (YaRN with its attention factor 1, as the reference)."""
    need = get.need
    n, head_dim = need("num_hidden_layers"), need("head_dim")
    rates = {
        "compressed_sparse_attention": 4,
        "heavily_compressed_attention": 128,
        **get("compress_rates", dict, {}),
    }
    types = get("layer_types", list, None)
    ratios = get("compress_ratios", list, None)
    if types is None and ratios is not None:
        by_ratio = {
            0: "sliding_attention",
            rates["compressed_sparse_attention"]: "compressed_sparse_attention",
            rates["heavily_compressed_attention"]: "heavily_compressed_attention",
        }
        if any(r not in by_ratio for r in ratios):
            raise ValueError(
                f"{source}: field 'compress_ratios': each one of {sorted(by_ratio)}, got {ratios}"
            )
        types = [by_ratio[r] for r in ratios]
    if types is None:
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
            for i in range(max(n - 2, 0))
        ]
    mlp = get("mlp_layer_types", list, None)
    if mlp is None:
        hashed = get("num_hash_layers", int, 3)
        mlp = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
    rope = get("rope_parameters", dict, None) or {}
    partial = get("partial_rotary_factor", float, None)
    if partial is None and get("qk_rope_head_dim", int, None) is not None:
        partial = get("qk_rope_head_dim", int) / head_dim
    main, compress = rope.get("main"), rope.get("compress")
    if not isinstance(main, dict) or not isinstance(compress, dict):
        flat = {k: v for k, v in (get("rope_scaling", dict, None) or rope).items()}
        main = {"rope_theta": get("rope_theta", float, 10000.0)}
        compress = {**flat, "rope_theta": get("compress_rope_theta", float, 160000.0)}
    partial = partial or float(main.get("partial_rotary_factor") or 64 / 512)
    scaling = {
        k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor")
    }
    if scaling.get("rope_type", scaling.get("type", "default")) == "yarn":
        scaling.setdefault("attention_factor", 1.0)  # the reference leaves cos/sin unscaled
    else:
        scaling = {}
    if get("hidden_act", str, "silu") != "silu":
        raise ValueError(
            f"{source}: field 'hidden_act': refmoe runs silu, got {get('hidden_act', str)!r}"
        )
    scoring = get("scoring_func", str, "sqrtsoftplus")
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise ValueError(
            f"{source}: field 'scoring_func': sqrtsoftplus, sigmoid or softmax, got {scoring!r}"
        )
    return dict(
        head_dim=head_dim,
        partial_rotary_factor=partial,
        intermediate_size=0,
        moe_intermediate_size=need("moe_intermediate_size"),
        n_routed_experts=need("n_routed_experts"),
        num_experts_per_tok=need("num_experts_per_tok"),
        n_shared_experts=get("n_shared_experts", int, None) or 0,
        norm_topk_prob=True,  # V4's routers always normalize the chosen scores
        routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
        scoring_func=scoring,
        hidden_act="silu_clamp",  # silu(min(gate, limit)) * clamp(up, -limit, limit)
        swiglu_limit=get("swiglu_limit", float, 10.0),
        q_lora_rank=need("q_lora_rank"),
        sliding_window=need("sliding_window"),
        layer_types=types,
        compress_rates=rates,
        rope_theta=float(main.get("rope_theta") or 10000.0),
        rope_scaling=None,
        compress_rope_theta=float(compress.get("rope_theta") or 160000.0),
        compress_rope_scaling=scaling or None,
        hc_mult=need("hc_mult"),
        hc_sinkhorn_iters=get("hc_sinkhorn_iters", int, 20),
        hc_eps=get("hc_eps", float, 1e-6),
        mlp_layer_types=mlp,
        o_groups=need("o_groups"),
        o_lora_rank=need("o_lora_rank"),
        index_n_heads=get("index_n_heads", int, None) or 0,
        index_head_dim=get("index_head_dim", int, None) or 0,
        index_topk=get("index_topk", int, None) or 0,
        attention_sinks=True,
    )


def _dsa_fields(family: str, get: _Fields, source: str) -> dict:
    """DSA's indexer fields (DeepSeek-V3.2, GLM-5). GLM-5's layers either run their indexer
    (full) or reuse the previous full layer's selection (shared): indexer_types, else as
    transformers derives it from index_topk_pattern ("FSS...") or index_topk_freq and
    index_skip_topk_offset; its dense layers come as mlp_layer_types."""
    need = get.need
    f: dict = dict(
        index_n_heads=need("index_n_heads"),
        index_head_dim=need("index_head_dim"),
        index_topk=need("index_topk"),
    )
    if family != "glm_moe_dsa":
        return f
    n = need("num_hidden_layers")
    types = get("indexer_types", list, None)
    pattern = get("index_topk_pattern", str, None)
    if types is None and pattern is not None:
        bad = set(pattern) - {"F", "S"}
        if bad:
            raise ValueError(
                f"{source}: field 'index_topk_pattern': F or S per layer, got {pattern!r}"
            )
        types = ["full" if c == "F" else "shared" for c in pattern]
    if types is None:
        freq = max(get("index_topk_freq", int, 1), 1)
        offset = get("index_skip_topk_offset", int, 2)
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    mlp = get("mlp_layer_types", list, None)
    dense = get("first_k_dense_replace", int, None) or 0
    if mlp is not None:
        dense = sum(1 for t in mlp if t == "dense")
        if mlp != ["dense"] * dense + ["sparse"] * (len(mlp) - dense) or len(mlp) != n:
            raise ValueError(
                f"{source}: field 'mlp_layer_types': refmoe runs dense layers first, then MoE "
                f"(one per layer), got {mlp!r}"
            )
    return f | dict(indexer_types=types, index_rope_interleave=True, first_k_dense_replace=dense)


def _gqa_fields(family: str, get: _Fields, heads: int, hidden: int, source: str) -> dict:
    """The fields of a GQA family (Qwen3-MoE, GLM-4.5, MiniMax-M2, gpt-oss) from its
    config.json, under the names each one's release writes."""
    need = get.need
    rope = get("rope_parameters", dict, {})
    head_dim = get("head_dim", int, None) or (hidden // heads if heads > 0 else 0)
    partial = get("partial_rotary_factor", float, None) or float(
        rope.get("partial_rotary_factor") or 1.0
    )
    rotary_dim = get("rotary_dim", int, None)  # MiniMax-M2's own name for it
    if rotary_dim is not None and head_dim > 0:
        partial = rotary_dim / head_dim
    if family != "gpt_oss" and get("hidden_act", str, "silu") != "silu":
        raise ValueError(
            f"{source}: field 'hidden_act': refmoe runs silu, got {get('hidden_act', str)!r}"
        )
    f: dict = dict(
        head_dim=head_dim,
        partial_rotary_factor=partial,
        num_experts_per_tok=need("num_experts_per_tok"),
        first_k_dense_replace=0,
    )
    if family == "qwen3_moe":
        if get("mlp_only_layers", list, None) or get("decoder_sparse_step", int, 1) != 1:
            raise ValueError(
                f"{source}: mlp_only_layers / decoder_sparse_step != 1 are not supported"
            )
        return f | dict(
            intermediate_size=get("intermediate_size", int, None) or 0,
            moe_intermediate_size=need("moe_intermediate_size"),
            n_routed_experts=need("num_experts"),
            norm_topk_prob=get("norm_topk_prob", bool, False),
            scoring_func="softmax",
            attention_bias=get("attention_bias", bool, False),
        )
    if family in ("qwen3_next", "qwen3_5_moe"):
        # Qwen3-MoE's router (Qwen3.5's always normalizes its top-k); linear and gated
        # attention; (1 + w) norms. Qwen3.5's multimodal rope (mrope_section) gives a text
        # token the same angle on every section: plain rope over its partial rotary dims.
        if get("mlp_only_layers", list, None) or get("decoder_sparse_step", int, 1) != 1:
            raise ValueError(
                f"{source}: mlp_only_layers / decoder_sparse_step != 1 are not supported"
            )
        n, every = need("num_hidden_layers"), get("full_attention_interval", int, 4)
        if every < 1:
            raise ValueError(f"{source}: field 'full_attention_interval' must be positive")
        types = get("layer_types", list, None) or [
            "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)
        ]
        return f | dict(
            intermediate_size=get("intermediate_size", int, None) or 0,
            moe_intermediate_size=need("moe_intermediate_size"),
            n_routed_experts=need("num_experts"),
            norm_topk_prob=family == "qwen3_5_moe" or get("norm_topk_prob", bool, True),
            scoring_func="softmax",
            attention_bias=get("attention_bias", bool, False),
            attention_out_bias=get("attention_bias", bool, False),
            attention_output_gate=True,
            norm_offset=True,
            partial_rotary_factor=get("partial_rotary_factor", float, None)
            or float(rope.get("partial_rotary_factor") or 0.25),
            layer_types=types,
            linear_num_key_heads=need("linear_num_key_heads"),
            linear_num_value_heads=need("linear_num_value_heads"),
            linear_key_head_dim=need("linear_key_head_dim"),
            linear_value_head_dim=need("linear_value_head_dim"),
            linear_conv_kernel_dim=need("linear_conv_kernel_dim"),
            shared_expert_intermediate_size=get("shared_expert_intermediate_size", int, 0),
        )
    if family == "glm4_moe":  # DeepSeek-V3's router and MoE layout under GQA
        return (
            f
            | _noaux_tc_fields(get)
            | dict(
                intermediate_size=get("intermediate_size", int, None) or 0,
                qk_norm="head" if get("use_qk_norm", bool, False) else "none",
                attention_bias=get("attention_bias", bool, False),
            )
        )
    if family == "minimax_m2":  # experts are intermediate_size wide; no shared expert
        if get("shared_intermediate_size", int, 0):
            raise ValueError(
                f"{source}: field 'shared_intermediate_size': a shared expert "
                "is not part of MiniMax-M2 (expected 0)"
            )
        if get("scoring_func", str, "sigmoid") != "sigmoid":
            raise ValueError(f"{source}: field 'scoring_func': MiniMax-M2 routes by sigmoid")
        return f | dict(
            intermediate_size=0,
            moe_intermediate_size=need("intermediate_size"),
            n_routed_experts=need("num_local_experts"),
            norm_topk_prob=True,
            routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
            qk_norm="all" if get("use_qk_norm", bool, True) else "none",
        )
    # gpt-oss: sinks, alternating sliding/full layers, biases everywhere, clamped SwiGLU
    types = get("layer_types", list, None)
    if types is None:
        n = need("num_hidden_layers")
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return f | dict(
        intermediate_size=0,
        moe_intermediate_size=need("intermediate_size"),
        n_routed_experts=need("num_local_experts"),
        scoring_func="softmax_topk",
        router_bias=True,
        hidden_act="swiglu_oai",
        swiglu_alpha=get("swiglu_alpha", float, 1.702),
        swiglu_limit=get("swiglu_limit", float, 7.0),
        expert_bias=True,
        qk_norm="none",
        attention_bias=get("attention_bias", bool, True),
        attention_out_bias=get("attention_bias", bool, True),
        attention_sinks=True,
        sliding_window=get("sliding_window", int, None) or 0,
        layer_types=types,
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Typed reads of config.json's fields, each error naming the file and the field."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def __call__(self, name: str, kind: type, default=None):
        v = self.d.get(name)
        if v is None:
            return default
        return self._cast(name, v, kind)

    def need(self, name: str, kind: type = int):
        for alias in (name, *ALIASES.get(name, ())):
            if self.d.get(alias) is not None:
                return self._cast(alias, self.d[alias], kind)
        raise ValueError(f"{self.source}: missing field {name!r}")

    def _cast(self, name: str, v, kind: type):
        ok = {
            int: _is_int(v) or isinstance(v, float) and v.is_integer(),
            float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            bool: isinstance(v, bool),
            str: isinstance(v, str),
            dict: isinstance(v, dict),
            list: isinstance(v, list),
        }[kind]
        if not ok:
            want = {
                int: "an integer",
                float: "a finite number",
                bool: "true or false",
                str: "a string",
                dict: "an object",
                list: "a list",
            }[kind]
            raise ValueError(f"{self.source}: field {name!r} must be {want}, got {v!r:.80}")
        return kind(v)


def expert_format(q: dict | None, where: str) -> tuple[str, int]:
    """The expert format a quantization_config names, with its group size; an unknown or
    contradictory one is refused naming the field."""
    if q is None:
        return "bf16", 0
    method = q.get("quant_method")
    if method == "fp8":
        fp4 = q.get("expert_dtype", "fp8")  # DeepSeek-V4: FP4 experts, FP8 everything else
        if fp4 not in ("fp8", "fp4"):
            raise ValueError(f"{where}.expert_dtype: fp8 or fp4, got {fp4!r}")
        return ("mxfp4", 32) if fp4 == "fp4" else ("fp8", 128)
    if method == "mxfp4":  # gpt-oss, DeepSeek-V4: E2M1 + E8M0 per 32
        return "mxfp4", 32
    if method == "modelopt":
        algo = q.get("quant_algo")
        if algo != "NVFP4":
            raise ValueError(f"{where}.quant_algo: refmoe reads NVFP4 from modelopt, got {algo!r}")
        if q.get("group_size", 16) != 16:
            raise ValueError(f"{where}.group_size: NVFP4 scales 16 codes, got {q['group_size']}")
        return "nvfp4", 16
    if method == "compressed-tensors":
        if q.get("format") == "float-quantized":  # FP8 weights (llm-compressor's FP8 schemes)
            fp8_block(q, where)
            return "fp8", 128
        if q.get("format") != "pack-quantized":
            raise ValueError(
                f"{where}.format: refmoe reads compressed-tensors pack-quantized (INT4) and "
                f"float-quantized (FP8), got {q.get('format')!r}"
            )
        groups = q.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError(f"{where}.config_groups: expected one group of INT4 weights")
        sizes = set()
        for gname, group in groups.items():
            w = (group or {}).get("weights") or {}
            field = f"{where}.config_groups.{gname}.weights"
            want = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
            for key, value in want.items():
                if w.get(key) != value:
                    raise ValueError(f"{field}.{key}: expected {value!r}, got {w.get(key)!r}")
            if w.get("dynamic") or (group or {}).get("input_activations"):
                raise ValueError(f"{field}: W4A16 only (no activation quantization)")
            size = w.get("group_size")
            if not isinstance(size, int) or size < 32 or size % 32:
                raise ValueError(f"{field}.group_size: a multiple of 32, got {size!r}")
            sizes.add(size)
        if len(sizes) != 1:
            raise ValueError(f"{where}.config_groups: one group size, got {sorted(sizes)}")
        return "int4g", sizes.pop()
    raise ValueError(
        f"{where}.quant_method: refmoe reads fp8, mxfp4, modelopt (NVFP4) and "
        f"compressed-tensors (pack-quantized INT4, float-quantized FP8), got {method!r}"
    )


def _block_sizes(block, field: str) -> tuple[int, int]:
    if not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(
            isinstance(b, int) and not isinstance(b, bool) and 0 < b < formats.WHOLE for b in block
        )
    ):
        raise ValueError(f"{field}: two positive block sizes (rows, columns), got {block!r}")
    return int(block[0]), int(block[1])


def fp8_scheme(q: dict | None) -> tuple[tuple[int, int], bool]:
    """(the block one FP8 scale covers, 128 x 128 where none is named; whether the config
    names none: quant_method fp8 without weight_block_size, or no FP8 at all)."""
    block = fp8_block(q, "quantization_config")
    named = block is not None and not (
        q is not None and q.get("quant_method") == "fp8" and "weight_block_size" not in q
    )
    return block or (128, 128), not named


def fp8_block(q: dict | None, where: str) -> tuple[int, int] | None:
    """The block one FP8 weight scale covers, from a quantization_config (None: not FP8):
    quant_method fp8 with any weight_block_size (128 x 128 where it names none), or
    compressed-tensors float-quantized with strategy block (its block_structure), channel
    (1, WHOLE) or tensor (WHOLE, WHOLE). Activation quantization a config asks for
    (input_activations) is not applied: activations stay float32 (W8A16), which is what the
    weights alone define. A config that contradicts itself is refused naming the field."""
    if q is None:
        return None
    if q.get("quant_method") == "fp8":
        return _block_sizes(q.get("weight_block_size", [128, 128]), f"{where}.weight_block_size")
    if q.get("quant_method") != "compressed-tensors" or q.get("format") != "float-quantized":
        return None
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}.config_groups: expected one group of FP8 weights")
    blocks = set()
    for gname, group in groups.items():
        w = (group or {}).get("weights") or {}
        field = f"{where}.config_groups.{gname}.weights"
        want = {"num_bits": 8, "type": "float", "symmetric": True}
        for key, value in want.items():
            if w.get(key) != value:
                raise ValueError(f"{field}.{key}: expected {value!r}, got {w.get(key)!r}")
        if w.get("dynamic"):
            raise ValueError(f"{field}.dynamic: FP8 weights carry their scales, got True")
        strategy = w.get("strategy")
        if strategy == "block":
            blocks.add(_block_sizes(w.get("block_structure"), f"{field}.block_structure"))
        elif strategy == "channel":
            blocks.add((1, formats.WHOLE))
        elif strategy == "tensor":
            blocks.add((formats.WHOLE, formats.WHOLE))
        else:
            raise ValueError(
                f"{field}.strategy: refmoe reads FP8 by block, channel or tensor, got {strategy!r}"
            )
    if len(blocks) != 1:
        raise ValueError(f"{where}.config_groups: one FP8 weight scheme, got {len(blocks)}")
    return blocks.pop()
