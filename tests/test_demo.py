"""`refmoe demo` and `refmoe bench decode` on the smallest V3-shaped model (1 layer, 16
experts, ~1 GB written to a temporary directory)."""

import json
import subprocess
import sys

import pytest

from refmoe import demo
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.build(tmp_path_factory.mktemp("demo"), layers=1, experts=16)


def fp8_bytes(rows: int, cols: int) -> int:
    """An FP8 matrix as the demo writes it: a byte a weight, a float32 scale per 128 x 128."""
    return rows * cols + -(-rows // 128) * -(-cols // 128) * 4


def test_built_checkpoint_is_a_v3_fp8_checkpoint(demo_dir):
    cfg = ModelConfig.from_file(demo_dir)
    assert cfg.is_fp8 and cfg.hidden_size == 7168 and cfg.kv_lora_rank == 512
    ck = Checkpoint(demo_dir)
    assert ck.dtype("model.layers.0.mlp.experts.15.down_proj.weight") == "float8_e4m3fn"
    assert ck.get("model.layers.0.mlp.experts.3.up_proj.weight_scale_inv").shape == (16, 56)
    mtime = (demo_dir / "config.json").stat().st_mtime
    demo.build(demo_dir, layers=1, experts=16)  # cached: not rebuilt
    assert (demo_dir / "config.json").stat().st_mtime == mtime


def test_run_reports_the_bound(demo_dir):
    r = demo.run(demo_dir, prompt_tokens=4, new_tokens=4)
    attn = 1536 * 7168 + 128 * 192 * 1536 + 576 * 7168 + 128 * 256 * 512 + 7168 * 16384
    attn_scales = sum(
        -(-n // 128) * -(-k // 128) * 4
        for n, k in ((1536, 7168), (128 * 192, 1536), (576, 7168), (128 * 256, 512), (7168, 16384))
    )
    head = 8192 * 7168 + 64 * 56 * 4
    assert r.bytes_per_token == attn + attn_scales + 9 * demo.EXPERT_BYTES + head
    assert (
        r.tok_s > 0
        and r.read_gbps > 0
        and r.bound_tok_s == pytest.approx(r.read_gbps * 1e9 / r.bytes_per_token)
    )


def test_cli(demo_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "refmoe.cli",
            "demo",
            "--dir",
            str(demo_dir),
            "--layers",
            "1",
            "--experts",
            "16",
            "--prompt-tokens",
            "4",
            "--max-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "TTFT" in out and "tok/s" in out and "bound" in out
    assert f"refmoe serve --model {demo_dir}" in out and "gibberish" in out

    assert "refmoe-sim, calibrated from micro-benchmarks just now" in out
    rows = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "refmoe.cli",
                "bench",
                "decode",
                "--dir",
                str(demo_dir),
                "--layers",
                "1",
                "--experts",
                "16",
                "--reps",
                "1",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
    )
    assert rows[0]["op"] == "decode" and 0 < rows[0]["ratio"] < 2
    # the read measured on both sides of the decode, and whether anything else ran meanwhile
    row = rows[0]
    assert row["limit_gbps_before"] > 0 and row["limit_gbps_after"] > 0
    assert min(row["limit_gbps_before"], row["limit_gbps_after"]) <= row["limit_gbps"]
    assert row["limit_gbps"] <= max(row["limit_gbps_before"], row["limit_gbps_after"])
    assert row["others_cores"] >= 0 and 1 <= row["attempts"] <= 3
    assert isinstance(row["suspect"], str)


def test_the_demo_answers_chat(demo_dir):
    """The demo ships a tokenizer and a chat template: a chat message through the server's
    own path (template, tokens, generation, text) works on it."""
    from refmoe import models
    from refmoe.demo_tokenizer import ASSISTANT, USER
    from refmoe.generate import generate
    from refmoe.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(demo_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hello, café"}])
    assert text.endswith(f"{USER}hello, café{ASSISTANT}")
    ids = tok.encode(text, False)
    assert tok.decode(ids) == "hello, café"  # the special tokens decode to nothing
    cfg, model = models.load(demo_dir)
    assert max(ids) < cfg.vocab_size
    g = generate(model, ids, 3)
    assert len(g.token_ids) == 3 and isinstance(tok.decode(g.token_ids), str)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4g"])
def test_demo_in_a_4bit_expert_format(fmt, tmp_path, demo_dir):
    """--expert-format: the routed experts as the 4-bit releases store them (FP8 attention and
    shared expert), loaded as stored; a token reads their packed bytes and scales (about half
    a byte a weight) instead of FP8's one byte."""
    from refmoe import kernels

    d = demo.build(tmp_path / fmt, layers=1, experts=16, expert_format=fmt)
    cfg = ModelConfig.from_file(d)
    assert cfg.expert_format[0] == fmt
    r = demo.run(d, prompt_tokens=4, new_tokens=4)
    scale_bytes = 2 if fmt == "int4g" else 1
    per_expert = 0
    for rows, cols in ((2048, 7168), (2048, 7168), (7168, 2048)):
        row_bytes, nscales = kernels.lut4_shapes(fmt, cols, 32)
        per_expert += rows * (row_bytes + nscales * scale_bytes)
    fp8_run = demo.run(demo_dir, 4, 4)  # the same model in FP8
    # the 8 routed experts a token reads, in the 4-bit format instead of FP8; the rest equal
    assert fp8_run.bytes_per_token - r.bytes_per_token == 8 * (demo.EXPERT_BYTES - per_expert)
    assert r.tok_s > 0 and r.new_tokens == 4
    from sim import costs  # the simulator counts what the engine reads, format included

    assert costs.bytes_per_token(cfg) == r.bytes_per_token


@pytest.mark.parametrize("family", ["minimax_m2", "gpt_oss", "glm4_moe", "qwen3_moe"])
def test_demo_of_a_gqa_family(family, tmp_path):
    """`refmoe demo --family F`: the family's published layer under its own tensor names
    (gpt-oss: MXFP4 experts fused as released), loaded by its model file, decoding; the bound
    counts every projection (q, k, v, o), the routed top-k (and GLM's shared expert) in their
    stored bytes, and lm_head. Qwen3-MoE's (issue 23's second demo): Qwen3-235B-A22B's layer,
    per-head q/k norms, a softmax router, no shared expert."""
    d = demo.build(
        tmp_path,
        layers=1,
        experts=16,
        family=family,
        expert_format="mxfp4" if family == "gpt_oss" else "fp8",
    )
    cfg = ModelConfig.from_file(d)
    assert cfg.family == family and cfg.n_routed_experts == 16
    if family == "qwen3_moe":
        assert (cfg.qk_norm, cfg.scoring_func, cfg.n_shared_experts) == ("head", "softmax", 0)
        assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (4096, 64, 4)
    r = demo.run(d, prompt_tokens=4, new_tokens=3)
    assert r.new_tokens == 3 and r.tok_s > 0
    # transformers reads the demo's tokenizer as written, whatever the family (llama.cpp's
    # converter does, for benchmarks/peer_decode.py): no token past the vocabulary
    from transformers import AutoTokenizer

    assert max(AutoTokenizer.from_pretrained(d).vocab.values()) < cfg.vocab_size
    h, n, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = fp8_bytes(n * dh, h) + 2 * fp8_bytes(g * dh, h) + fp8_bytes(h, n * dh)
    i, k = cfg.moe_intermediate_size, cfg.num_experts_per_tok
    if family == "gpt_oss":  # MXFP4: half a byte a weight, one scale byte per 32
        expert = 2 * (i * h // 2 + i * h // 32) + h * i // 2 + h * i // 32
    else:
        expert = 3 * fp8_bytes(i, h)
    experts = (k + cfg.n_shared_experts) * expert
    assert r.bytes_per_token == attn + experts + fp8_bytes(cfg.vocab_size, h)
    with pytest.raises(ValueError, match="--expert-format"):
        demo.demo_config(
            1, 16, expert_format="fp8" if family == "gpt_oss" else "mxfp4", family=family
        )


def test_demo_of_qwen3_next(tmp_path):
    """`refmoe demo --family qwen3_next`: Qwen3-Next-80B-A3B's layers (three Gated DeltaNet
    to one gated full attention; with fewer than four, the last is full), decoding; the bound
    counts each linear layer's projections (b and a as floats), the full layer's gated q, k,
    v, o, the routed top-10 and the shared expert, and lm_head."""
    d = demo.build(tmp_path, layers=4, experts=16, family="qwen3_next")
    cfg = ModelConfig.from_file(d)
    assert cfg.family == "qwen3_next" and cfg.layer_types == ["linear_attention"] * 3 + [
        "full_attention"
    ]
    assert demo.demo_config(2, 16, family="qwen3_next")["layer_types"] == [
        "linear_attention",
        "full_attention",
    ]
    r = demo.run(d, prompt_tokens=12, new_tokens=3)
    assert r.new_tokens == 3 and r.tok_s > 0
    h, n, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    linear = fp8_bytes(2 * hk * dk + 2 * hv * dv, h) + 2 * hv * h * 4 + fp8_bytes(h, hv * dv)
    full = fp8_bytes(2 * n * dh, h) + 2 * fp8_bytes(g * dh, h) + fp8_bytes(h, n * dh)
    experts = (cfg.num_experts_per_tok + 1) * 3 * fp8_bytes(cfg.moe_intermediate_size, h)
    want = 3 * linear + full + 4 * experts + fp8_bytes(cfg.vocab_size, h)
    assert r.bytes_per_token == want
    rows = demo.decode_at_contexts(d, [8, 64], steps=1)  # synthetic caches of both kinds
    assert [r["attention"] for r in rows] == ["gqa + linear"] * 2 and rows[1]["step_ms"] > 0
    assert demo.describe(cfg).startswith(
        "qwen3_next per-layer shapes (hidden 2048, 3 Gated DeltaNet + 1 gated full-attention"
    )


def test_demo_of_qwen3_5_moe(tmp_path):
    """`refmoe demo --family qwen3_5_moe`: Qwen3.5-397B-A17B's layers as its FP8 release
    stores them (a linear layer's qkv and z FP8, b and a floats; experts one by one), a
    linear and a full layer (two layers: the last is full), decoding; the bound counts those
    projections, the gated full attention, the routed top-10 and the shared expert, and
    lm_head."""
    d = demo.build(tmp_path, layers=2, experts=16, family="qwen3_5_moe")
    cfg = ModelConfig.from_file(d)
    assert cfg.family == "qwen3_5_moe"
    assert cfg.layer_types == ["linear_attention", "full_attention"]
    assert (cfg.hidden_size, cfg.linear_num_value_heads, cfg.num_experts_per_tok) == (4096, 64, 10)
    r = demo.run(d, prompt_tokens=12, new_tokens=3)
    assert r.new_tokens == 3 and r.tok_s > 0
    h, n, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    linear = (
        fp8_bytes(2 * hk * dk + hv * dv, h)
        + fp8_bytes(hv * dv, h)
        + 2 * hv * h * 4
        + fp8_bytes(h, hv * dv)
    )
    full = fp8_bytes(2 * n * dh, h) + 2 * fp8_bytes(g * dh, h) + fp8_bytes(h, n * dh)
    experts = (cfg.num_experts_per_tok + 1) * 3 * fp8_bytes(cfg.moe_intermediate_size, h)
    assert r.bytes_per_token == linear + full + 2 * experts + fp8_bytes(cfg.vocab_size, h)
    assert demo.describe(cfg).startswith(
        "qwen3_5_moe per-layer shapes (hidden 4096, 1 Gated DeltaNet + 1 gated full-attention"
    )


def test_demo_of_deepseek_v4(tmp_path):
    """`refmoe demo --family deepseek_v4`: V4-Flash's layer (64 heads on one KV head of 512,
    the grouped output projection, an HCA layer's compressor), FP8 projections with E8M0 block
    scales and FP4 routed experts as released, decoding; the bound counts every projection
    (the compressor's too), the six routed experts in their FP4 bytes, the FP8 shared expert,
    and lm_head."""
    d = demo.build(tmp_path, layers=1, experts=8, family="deepseek_v4", expert_format="mxfp4")
    cfg = ModelConfig.from_file(d)
    assert cfg.family == "deepseek_v4" and cfg.layer_types == ["heavily_compressed_attention"]
    assert cfg.mlp_layer_types == ["hash_moe"] and cfg.expert_format == ("mxfp4", 32)
    r = demo.run(d, prompt_tokens=6, new_tokens=3)
    assert r.new_tokens == 3 and r.tok_s > 0
    h, n, dh, rank = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    g, lora, i = cfg.o_groups, cfg.o_lora_rank, cfg.moe_intermediate_size
    attn = (
        fp8_bytes(rank, h)
        + fp8_bytes(n * dh, rank)
        + fp8_bytes(dh, h)
        + fp8_bytes(g * lora, n * dh // g)
    )
    attn += fp8_bytes(h, g * lora) + 2 * fp8_bytes(dh, h)  # o_b; the compressor's kv and gate
    fp4 = 2 * (i * h // 2 + i * h // 32) + h * i // 2 + h * i // 32
    experts = cfg.num_experts_per_tok * fp4 + 3 * fp8_bytes(i, h)
    assert r.bytes_per_token == attn + experts + fp8_bytes(cfg.vocab_size, h)
    rows = demo.decode_at_contexts(d, [8, 300], steps=1)  # 300: two closed HCA windows
    assert [r["attention"] for r in rows] == ["v4"] * 2 and rows[1]["step_ms"] > 0
    assert 0 < rows[0]["cache_bytes"] <= rows[1]["cache_bytes"]
    with pytest.raises(ValueError, match="--expert-format"):
        demo.demo_config(1, 8, expert_format="fp8", family="deepseek_v4")
