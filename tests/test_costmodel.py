"""The cost model (refmoe/costmodel.py) on its own, as a specification: which path a prompt
takes on the paper's box and on this one, what the device pays per weight, the streaming rule,
the rates it measures."""

import dataclasses

import pytest

from refmoe import costmodel
from refmoe.config import ModelConfig
from sim.paper import V3 as PAPER_V3

V3 = ModelConfig.from_dict(PAPER_V3, "V3")  # DeepSeek-V3 as the paper runs it
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
