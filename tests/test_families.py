"""The GQA families beside Qwen3-MoE, end to end against transformers (the oracle nobody here
wrote): GLM-4.5 (Glm4MoeForCausalLM), MiniMax-M2 (MiniMaxM2ForCausalLM) and gpt-oss
(GptOssForCausalLM). Tiny random configs saved with save_pretrained, varied over each family's
options (partial rotary, q/k norms per head or over all heads, attention biases, dense first
layers, expert groups, shared experts, sinks, sliding windows narrower than the prompt, the
SwiGLU clamp reached), loaded by refmoe, compared on logits and on 32 greedy tokens through
`refmoe generate`; one FP8 checkpoint per family that ships FP8 (GLM, MiniMax) and gpt-oss's
MXFP4 in its released layout (fused, gate and up interleaved); bad configs give named errors.
"""

import json

import numpy as np
import pytest
import torch
from conftest import (
    assert_cache_bytes,
    assert_logits_match,
    cli_generate,
    hf_greedy,
    randomize_bf16,
)
from test_deepseek_v3 import write_fp8_checkpoint
from test_expert_formats import TOL as Q8_TOL

from refmoe import models, slp
from refmoe.checkpoint import save_file
from refmoe.config import ModelConfig
from refmoe.kernels import formats

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    eos_token_id=None,
    bos_token_id=None,
)
FAMILIES = {
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=True,
        ),
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, rotary_dim=8),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,  # narrower than the prompt: the window is exercised
            swiglu_limit=1.0,  # reached by these weights: the clamps are exercised
        ),
    ),
}
VARIANTS = {
    "glm4_moe": {
        "base": {},
        "air_like": dict(  # no q/k norm, full rotary, a wider shared expert, raw top-k
            use_qk_norm=False,
            partial_rotary_factor=1.0,
            n_shared_experts=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            tie_word_embeddings=True,
        ),
    },
    "minimax_m2": {
        "base": {},
        "full_rotary_mha": dict(rotary_dim=16, num_key_value_heads=4, num_experts_per_tok=3),
    },
    "gpt_oss": {
        "base": {},
        "full_first": dict(
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            sliding_window=2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    },
}
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 93]
CASES = [(f, v) for f in FAMILIES for v in VARIANTS[f]]


def build(family: str, variant: str = "base", seed: int = 1):
    """A transformers model of the family, random, its weights rounded to bf16 values."""
    cfg_cls, model_cls, base = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **base, **VARIANTS[family][variant]})
    torch.manual_seed(seed)
    m = getattr(transformers, model_cls)(cfg).eval()
    randomize_bf16(m, bias_buffers=("e_score_correction_bias",))
    return m


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{v}" for f, v in CASES])
def saved(request, tmp_path_factory):
    family, variant = request.param
    m = build(family, variant)
    d = tmp_path_factory.mktemp(f"{family}-{variant}")
    m.save_pretrained(d)
    return family, m, d


def test_logits_match_transformers(saved):
    family, m, d = saved
    cfg, mine = models.load(d)
    assert cfg.family == family and type(mine).__module__ == f"refmoe.models.{family}"
    assert_logits_match(m, mine, PROMPT, 1e-4)
    # the KV budget's unit: keys and values of every KV head, float32, every layer
    cache = mine.new_cache()
    mine.forward(torch.tensor(PROMPT), cache)
    assert_cache_bytes(mine, cache, len(PROMPT))


def test_greedy_32_tokens_via_cli(saved):
    _, m, d = saved
    want = hf_greedy(m, PROMPT, 32)
    ids = ",".join(map(str, PROMPT))
    for prefill in ("cpu", "slp"):  # (auto picks one of these by measured rates)
        got = cli_generate(d, "--prompt-ids", ids, "--max-tokens", "32", "--prefill", prefill)
        assert len(want) == 32 and got["token_ids"] == want, prefill


@pytest.mark.parametrize("chunk", [None, 4])
def test_slp_equals_the_cpu_path(saved, chunk):
    """Stream-loading prefill (whole prompt, and in chunks of 4 with the cache carried on) gives
    the CPU path's logits: the family's experts, activation and biases as the kernels run
    them."""
    _, _, d = saved
    _, mine = models.load(d)
    plain = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    runner = slp.StreamPrefill(mine, ring=2, chunk_tokens=chunk)
    cache = mine.new_cache()
    out = runner.prefill(torch.tensor(PROMPT), cache)
    assert runner.stats.experts_loaded > 0 and cache.length == len(PROMPT)
    assert (out[-1] - plain[-1]).abs().max() <= 1e-4 * plain.abs().max()


def test_each_option_is_exercised():
    """The variants above reach what they claim: clamps hit, windows narrower than the
    prompt, partial rotary, sinks that move the softmax."""
    cfg = ModelConfig.from_dict(build("gpt_oss").config.to_dict())
    assert cfg.sliding_window < len(PROMPT) and cfg.window(0) == 4 and cfg.window(1) == 0
    assert cfg.attention_sinks and cfg.router_bias and cfg.expert_bias
    assert cfg.hidden_act == "swiglu_oai" and cfg.swiglu_limit == 1.0
    m = build("gpt_oss")
    hit: list[int] = []
    experts = m.model.layers[0].mlp.experts
    orig = experts._apply_gate
    experts._apply_gate = lambda gu: hit.append(int((gu.abs() > experts.limit).sum())) or orig(gu)
    with torch.no_grad():
        m(torch.tensor([PROMPT]))
    assert sum(hit) > 0, "the SwiGLU clamp never engaged"
    glm = ModelConfig.from_dict(build("glm4_moe").config.to_dict())
    assert glm.rotary_dim == 8 and glm.qk_norm == "head" and glm.attention_bias
    mm = ModelConfig.from_dict(build("minimax_m2").config.to_dict())
    assert mm.rotary_dim == 8 and mm.qk_norm == "all" and mm.moe_intermediate_size == 32


@pytest.mark.parametrize("family", ["glm4_moe", "minimax_m2"])
def test_fp8_checkpoint_against_dequantized_transformers(family, tmp_path):
    m = build(family)
    names = ("w1", "w3", "w2") if family == "minimax_m2" else ("gate_proj", "up_proj", "down_proj")
    # MiniMax's checkpoints keep the MoE block as block_sparse_moe (transformers: mlp)
    rename = (
        (lambda k: k.replace(".mlp.", ".block_sparse_moe.")) if family == "minimax_m2" else None
    )
    deq = write_fp8_checkpoint(m, tmp_path, projections=names, rename=rename)
    m.load_state_dict(deq)
    cfg, mine = models.load(tmp_path)
    assert cfg.is_fp8 and cfg.family == family
    assert all(b.ffn.experts.fmt == "fp8" for b in mine.blocks if hasattr(b.ffn, "experts"))
    assert mine.blocks[1].attn.q.codes is not None  # attention projections run as FP8 too
    assert_logits_match(m, mine, PROMPT, 1e-4)


def write_gpt_oss_mxfp4(m, d) -> None:
    """m's weights as gpt-oss is released: every layer's experts as MXFP4
    experts.gate_up_proj_blocks [E, 2I, H/32, 16] / _scales [E, 2I, H/32] (gate on even rows,
    up on odd) and down_proj_blocks / _scales, biases bf16, the rest as it is; m's experts are
    replaced by the exact dequantized values."""
    tensors, dtypes = {}, {}
    state = m.state_dict()
    for name, p in state.items():
        a = p.detach().float().numpy()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows = a.transpose(0, 2, 1)  # [E, N, K]: x @ W is W^T's rows
            enc = [formats.encode(r, "mxfp4") for r in rows]
            tensors[f"{name}_blocks"] = np.stack([b for b, _, _ in enc])
            tensors[f"{name}_scales"] = np.stack([s for _, s, _ in enc])
            k = rows.shape[2]
            back = np.stack([formats.mxfp4_dequantize(b, s, k) for b, s, _ in enc])
            state[name] = torch.from_numpy(back.transpose(0, 2, 1)).float()
        elif name.endswith("_bias") and "experts" in name:
            tensors[name], dtypes[name] = formats.bf16_encode(a), "BF16"
        else:
            tensors[name] = a
    m.load_state_dict(state)
    save_file(tensors, d / "model.safetensors", dtypes)
    cfg = json.loads(json.dumps(m.config.to_dict()))
    cfg["architectures"] = ["GptOssForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (d / "config.json").write_text(json.dumps(cfg))


def test_gpt_oss_mxfp4_as_released(tmp_path, monkeypatch):
    """MXFP4 read as stored (no requantizing); the oracle's experts see the same int8-per-32
    inputs the 4-bit kernels use (transformers' own expert code, with its input and its
    gated intermediate passed through formats.q8_quantize)."""
    m = build("gpt_oss")
    write_gpt_oss_mxfp4(m, tmp_path)
    cfg, mine = models.load(tmp_path)
    assert cfg.expert_format == ("mxfp4", 32)
    experts = mine.blocks[0].ffn.experts
    assert experts.fmt == "mxfp4" and experts.activation == "swiglu_oai" and experts.gate_bias

    def q8(x):
        flat = x.detach().reshape(-1, x.shape[-1]).float().numpy()
        return torch.from_numpy(formats.q8_quantize(flat)[1]).reshape(x.shape).to(x.dtype)

    cls = type(m.model.layers[0].mlp.experts)
    forward, gate = cls.forward, cls._apply_gate
    monkeypatch.setattr(cls, "forward", lambda self, h, *a, **k: forward(self, q8(h), *a, **k))
    monkeypatch.setattr(cls, "_apply_gate", lambda self, gu: q8(gate(self, gu)))
    assert_logits_match(m, mine, PROMPT, Q8_TOL)


def test_gpt_oss_mxfp4_streamed(tmp_path):
    """SLP streams the packed MXFP4 bytes (about half of BF16's) and its device dequantizes
    them exactly, with float activations: transformers' logits on the dequantized weights."""
    m = build("gpt_oss")
    write_gpt_oss_mxfp4(m, tmp_path)
    cfg, mine = models.load(tmp_path)
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    runner = slp.StreamPrefill(mine, ring=2)
    out = runner.prefill(torch.tensor(PROMPT), mine.new_cache())
    bf16_bytes = 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert runner.layout.nbytes < 0.6 * bf16_bytes
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize(
    "family, change, field",
    [
        ("minimax_m2", {"shared_intermediate_size": 64}, "shared_intermediate_size"),
        ("minimax_m2", {"scoring_func": "softmax"}, "scoring_func"),
        ("minimax_m2", {"rotary_dim": 7}, "rotary_dim"),
        ("glm4_moe", {"hidden_act": "gelu"}, "hidden_act"),
        ("gpt_oss", {"layer_types": ["full_attention"]}, "layer_types"),
        ("gpt_oss", {"layer_types": ["full_attention", "local", "full_attention"]}, "layer_types"),
        ("gpt_oss", {"sliding_window": 0}, "sliding_window"),
    ],
)
def test_bad_configs_named(family, change, field, tmp_path):
    d = build(family).config.to_dict()
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=field) as err:
        ModelConfig.from_file(tmp_path)
    assert "config.json" in str(err.value)


def test_missing_family_tensor_named(tmp_path):
    """A gpt-oss checkpoint without its sinks: the error names the tensor."""
    m = build("gpt_oss")
    m.save_pretrained(tmp_path)
    from safetensors.numpy import load_file

    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.sinks"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.sinks"):
        models.load(tmp_path)
