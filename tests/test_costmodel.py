"""The cost model (refmoe/costmodel.py) on its own, as a specification: which path a prompt
takes on the paper's box and on this one, what the device pays per weight, the streaming rule,
the rates it measures."""

import dataclasses

import pytest

from refmoe import costmodel
from refmoe.config import ModelConfig

V3 = ModelConfig.from_dict(
    dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        max_position_embeddings=163840,
    ),
    "V3",
)
PAPER = costmodel.Rates(
    h2d_gbps=53, cpu_gemv_gbps=900, cpu_gflops=4000, device_gflops=125000, devices=2
)


def test_cost_model_picks_cpu_for_short_slp_for_long():
    assert costmodel.choose_prefill(V3, 16, PAPER).path == "cpu"
    long = costmodel.choose_prefill(V3, 32768, PAPER)
    assert long.path == "slp" and long.devices == 2
    cross = costmodel.crossover_tokens(V3, PAPER, devices=1)
    assert 500 < cross < 20000
    slower = costmodel.Rates(**{**PAPER.as_dict(), "h2d_gbps": 26.5})
    assert costmodel.crossover_tokens(V3, slower, devices=1) > cross  # slower link: later


def test_cost_model_charges_the_device_its_dequantization():
    """With the CPU as the SLP device (torch converting FP8 at ~0.15 GB/s, as measured here)
    a few hundred tokens go to the CPU kernels, where the FLOP term alone picks SLP; past
    the point where the conversion amortizes SLP may win again. A GPU's conversion (0: free
    beside the link) changes nothing."""
    here = costmodel.Rates(
        h2d_gbps=6.9, cpu_gemv_gbps=12.5, cpu_gflops=84, device_gflops=138, device_weight_gbps=0.15
    )
    flops_only = costmodel.Rates(**{**here.as_dict(), "device_weight_gbps": 0.0})
    assert costmodel.choose_prefill(V3, 360, flops_only).path == "slp"
    assert costmodel.choose_prefill(V3, 360, here).path == "cpu"
    assert costmodel.crossover_tokens(V3, here) > 4 * costmodel.crossover_tokens(V3, flops_only)
    gpu = costmodel.Rates(**{**PAPER.as_dict(), "device_weight_gbps": 0.0})
    assert costmodel.crossover_tokens(V3, gpu) == costmodel.crossover_tokens(V3, PAPER)


def test_measured_device_rates_on_the_cpu():
    """The SLP lane timed at 16 and 1,024 tokens on a small expert shape: a matmul rate and a
    fixed per-weight rate (the FP8 conversion), both positive on the CPU."""
    cfg = dataclasses.replace(V3, hidden_size=512, moe_intermediate_size=256)
    gflops, weight_gbps = costmodel.measure_device(cfg, "cpu", reps=2)
    assert gflops > 0.5 and weight_gbps > 0


def test_cost_model_streaming_floor():
    """A whole pass of V3's experts over 53 GB/s takes ~12 s however short the prompt; two
    devices halve it."""
    one = costmodel.slp_expert_seconds(V3, 8192, PAPER, 1)
    two = costmodel.slp_expert_seconds(V3, 8192, PAPER, 2)
    full = 58 * 257 * costmodel.expert_bytes(V3) / 53e9
    assert full == pytest.approx(12.4, rel=0.05)
    assert one >= full and two < 0.6 * one


def test_one_streaming_rule():
    """Selective streaming while more than one expert of a layer is expected to go unused."""
    assert costmodel.streaming(V3, 1) == "selective"  # 8 of 256 experts hit
    assert costmodel.streaming(V3, 4096) == "prefetch"  # every expert hit
    assert costmodel.streaming_for(256, 254.9) == "selective"
    assert costmodel.streaming_for(256, 255.0) == "prefetch"
    # 256 (1 - (31/32)^t) reaches 255 at t = ln 256 / -ln(31/32) = 174.7 tokens
    assert costmodel.streaming(V3, 174) == "selective"
    assert costmodel.streaming(V3, 175) == "prefetch"
