"""Other engines' policies over the same machine model (sim/peers.py) and `refmoe-sim
compare` (sim/compare.py): each peer's mechanism as published, checked against the costs it
is built from, and refmoe beside them."""

import json
import math

import pytest
from sim_common import V3

from refmoe.config import ModelConfig
from sim import costs
from sim.compare import compare, interference, run_engine
from sim.hardware import Hardware
from sim.machine import Machine
from sim.peers import PEERS, derated, peer, simulate_peer
from sim.serve import Costs
from sim.workloads import WORKLOADS, get

PAPER = "paper-2x9355-2x5090"


def _moe_layers(cfg):
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def test_llama_cpp_copies_every_layers_experts_per_micro_batch():
    """A 1,024-token prompt is two micro-batches of 512; each copies every MoE layer's whole
    expert tensors (Q8_0 bytes) over PCIe before computing them: TTFT at least that copy
    time, and not much more (the compute on a 5090 is small beside it)."""
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load(PAPER)
    p = PEERS["llama.cpp"]
    layer = cfg.n_routed_experts * costs.routed_expert_bytes(cfg) + costs.shared_expert_bytes(cfg)
    copy = _moe_layers(cfg) * layer * p.weight_scale / (hw.gpus[0].pcie_gbps * 1e9)
    ttft = simulate_peer(cfg, hw, [(0.0, 1024, 2)], p).outcomes[0].ttft_s
    assert 2 * copy <= ttft < 2 * copy * 1.15
    # 1,056 tokens: a third micro-batch of 32, offloaded too; 1,025: its third of one token
    # stays on the CPU; 544: two copies, as for 1,024
    ttft_of = lambda n: simulate_peer(cfg, hw, [(0.0, n, 2)], p).outcomes[0].ttft_s  # noqa: E731
    assert ttft_of(1056) > 2.9 * copy
    assert 2 * copy <= ttft_of(1025) < 2.2 * copy
    assert 1.9 * copy < ttft_of(544) < 2.2 * copy


def test_below_the_threshold_experts_run_on_the_cpu():
    """31 tokens stay under llama.cpp's 32-token offload: the CPU path, at Q8_0's bytes."""
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load(PAPER)
    p = PEERS["llama.cpp"]
    ttft = simulate_peer(cfg, hw, [(0.0, 31, 2)], p).outcomes[0].ttft_s
    import simpy

    cost = Costs(cfg, hw, Machine(simpy.Environment(), hw), expert_scale=p.weight_scale)
    assert ttft == pytest.approx(cost.seconds(31, "cpu"), rel=1e-9)
    assert cost.seconds(31, "cpu") > Costs(cfg, hw, cost.machine).seconds(31, "cpu")


def test_ktransformers_offloads_by_prompt_length_in_sglang_chunks():
    """KTransformers' layerwise prefill: a prompt over the threshold copies whole layers per
    chunk (2,048 tokens on a 32 GB GPU: SGLang's default), one under it runs on the CPU."""
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load(PAPER)
    kt = PEERS["ktransformers"]
    assert kt.chunk(hw) == 2048
    h100 = Hardware.load("h100-box-2x8480")
    assert kt.chunk(h100) == 8192
    layer = cfg.n_routed_experts * costs.routed_expert_bytes(cfg) + costs.shared_expert_bytes(cfg)
    copy = _moe_layers(cfg) * layer / (hw.gpus[0].pcie_gbps * 1e9)
    long = simulate_peer(cfg, hw, [(0.0, 8192, 2)], kt).outcomes[0].ttft_s
    assert 4 * copy <= long < 4 * copy * 1.2
    short = simulate_peer(cfg, hw, [(0.0, 4096, 2)], kt).outcomes[0].ttft_s
    raised = peer("ktransformers", {"offload_above": 8192})
    assert simulate_peer(cfg, hw, [(0.0, 8192, 2)], raised).outcomes[0].ttft_s != long
    # at the threshold: two CPU chunks of 2,048, the second attending to the first
    from sim.peers import PeerSimulation

    sim = PeerSimulation(cfg, hw, [(0.0, 4096, 2)], kt)
    short = sim.run().outcomes[0].ttft_s
    assert {k[:2] for k in sim.cost.memo} == {("cpu", 2048), ("decode", 1)}
    prefix = sum(p.seconds for p in sim.cost.prefix(2048, 2048))
    assert short == pytest.approx(2 * sim.cost.seconds(2048, "cpu") + prefix, rel=1e-9)


def test_decode_waits_for_a_whole_prefill_under_sglang_and_rides_in_llama_cpp_steps():
    """KTransformers (SGLang's scheduler): no decode token while a prompt prefills, so one
    gap spans the prefill. llama.cpp: decode tokens ride in every step, each step as long as
    its four micro-batches. refmoe: decode on its own GPU and the CPU, nearly untouched."""
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load(PAPER)
    kt = interference("ktransformers", cfg, hw, 8192)
    assert kt["worst_gap_s"] >= kt["prefill_s"] * 0.99
    ll = interference("llama.cpp", cfg, hw, 8192)
    # 8,192 tokens alone: four steps of 2,048; beside a decode, each step carries its token
    # and 2,047 prompt tokens (n_batch counts both), so a fifth step takes the last few
    step = ll["prefill_alone_s"] / 4
    assert ll["worst_gap_s"] == pytest.approx(step, rel=0.1)
    assert 0.6 * step < ll["itl_during_ms"] / 1e3 <= step * 1.1  # with the steps in flight
    ref = interference("refmoe", cfg, hw, 8192)
    assert ref["slowdown"] < 1.2 < ll["slowdown"]
    assert ref["request_tpot_ratio"] < kt["request_tpot_ratio"]


def test_peers_on_a_cpu_only_box_never_offload():
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("vm-2vcpu-avx512-2026-12-04")
    for p in PEERS.values():
        run = simulate_peer(cfg, hw, [(0.0, 600, 3)], p)
        assert run.outcomes[0].ok
    import simpy

    cost = Costs(cfg, hw, Machine(simpy.Environment(), hw))
    assert "offload" not in {k[0] for k in cost.memo}


def test_a_peers_cpu_efficiency_slows_its_cpu_kernels():
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("vm-2vcpu-avx512-2026-12-04")
    half = derated(hw, 0.5)
    assert half.cpu.fp8_stream_gbps() == pytest.approx(hw.cpu.fp8_stream_gbps() / 2, rel=1e-6)
    assert hw.cpu.fp8_gemv_efficiency != half.cpu.fp8_gemv_efficiency  # a copy, not the profile
    a = run_engine("ktransformers", cfg, hw, [(0.0, 64, 6)]).outcomes[0]
    b = run_engine("ktransformers", cfg, hw, [(0.0, 64, 6)], {"cpu_efficiency": 0.5}).outcomes[0]
    ratio = sum(b.itl_s) / sum(a.itl_s)
    assert 1.5 < ratio <= 2.0 + 1e-9


def test_bad_peer_parameters_are_named():
    with pytest.raises(ValueError, match="no parameter chunk_size"):
        peer("llama.cpp", {"chunk_size": 3})
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        peer("vllm")
    with pytest.raises(ValueError, match="cpu_efficiency"):
        peer("llama.cpp", {"cpu_efficiency": 0})
    with pytest.raises(ValueError, match="unknown"):
        get("batch")
    with pytest.raises(ValueError, match="refmoe only"):
        run_engine("llama.cpp", ModelConfig.from_dict(V3), Hardware.load(PAPER), [], None, [[]])


def test_compare_puts_every_engine_side_by_side(tmp_path):
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load(PAPER)
    wl = WORKLOADS["chat"].scaled(num_prompts=6)
    res = compare(cfg, hw, wl, lengths=(1024, 8192), interference_tokens=8192)
    e = res["engines"]
    assert list(e) == ["refmoe", "llama.cpp", "ktransformers"]
    for row in e.values():
        assert set(row["ttft_s"]) == {1024, 8192}
        assert row["workload"]["completed"] == 6
        assert 0 <= row["workload"]["slo_attainment"] <= 1
        assert row["decode_tok_s"] > 0 and math.isfinite(row["interference"]["slowdown"])
    # SLP against the peers' copy-then-compute: refmoe's long prompt is many times faster
    assert e["refmoe"]["ttft_s"][8192] * 5 < e["ktransformers"]["ttft_s"][8192]
    assert e["ktransformers"]["ttft_s"][8192] < e["llama.cpp"]["ttft_s"][8192]
    # the agents' workload is refmoe's only, and says so
    agents = compare(
        cfg, hw, WORKLOADS["agent"].scaled(num_prompts=1), lengths=(1024,), interference_tokens=2048
    )
    assert "skipped" in agents["engines"]["llama.cpp"]["workload"]
    assert agents["engines"]["refmoe"]["workload"]["completed"] == 4


def test_compare_cli(tmp_path, capsys):
    from sim.cli import main

    png = tmp_path / "cmp.png"
    argv = [
        "compare",
        "--model",
        "deepseek-v3",
        "--hardware",
        PAPER,
        "--workload",
        "chat",
        "--num-prompts",
        "4",
        "--prompt-tokens",
        "1024,4096",
        "--interference-tokens",
        "4096",
        "--peer",
        "llama.cpp:forward_tokens=4096",
        "--plot",
        str(png),
        "--json",
    ]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["engines"]["llama.cpp"]["ttft_s"]["4096"] < 60  # one micro-batch of 4,096
    assert png.stat().st_size > 10_000
    assert main(argv[:-3] + ["--peer", "llama.cpp:speed=2"]) == 2
    assert "no parameter speed" in capsys.readouterr().err
    assert main(argv[:-3]) == 0
    out = capsys.readouterr().out
    assert "TTFT (s), 4,096 tokens" in out and "tools/server/server.cpp" in out
