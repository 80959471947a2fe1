"""The single-request prediction: costs from a config, profiles, the prefill paths, attention
over the context, routing, other model configs, the CLI."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sim_common import TRACE, V3

import sim
from refmoe import costmodel
from refmoe.config import ModelConfig
from sim import costs
from sim.hardware import Hardware
from sim.predict import predict, unique_experts


def test_costs_match_the_engine_count():
    doc = json.loads(TRACE.read_text())
    cfg = ModelConfig(**doc["metadata"]["model"])
    assert costs.bytes_per_token(cfg) == doc["metadata"]["result"]["bytes_per_token"]


def test_v3_bytes_per_token_as_the_paper_infers():
    """PAPER.md: one FP8 expert 44 MB, a token reads about 9 x 58 experts = 23 GB."""
    cfg = ModelConfig.from_dict(V3)
    assert costs.expert_bytes(cfg) / 9 == pytest.approx(44e6, rel=0.03)
    moe = sum(c.expert_bytes for c in costs.layer_costs(cfg))
    assert moe == pytest.approx(23e9, rel=0.03)


def test_paper_decode_within_10_percent():
    p = predict(ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090"), 32, 8)
    assert p.decode_tok_s == pytest.approx(21.5, rel=0.10)


def test_unique_experts():
    assert unique_experts(256, 8, 1) == pytest.approx(8)
    assert unique_experts(256, 8, 10_000) == pytest.approx(256)


def test_profile_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ncpu: {sockets: 1, cores_per_socket: 2, dram_gbps_per_socket: 10,"
        " dram_efficiency: 1.5}\n"
    )
    with pytest.raises(ValueError, match="dram_efficiency must lie in"):
        Hardware.load(bad)
    with pytest.raises(ValueError, match="no such hardware profile"):
        Hardware.load(tmp_path / "missing.yaml")


def test_cli_predict(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.cli",
            "predict",
            "--model",
            str(tmp_path),
            "--hardware",
            "paper-2x9355-2x5090",
            "--prompt-tokens",
            "64",
            "--output-tokens",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    p = json.loads(out.stdout)
    # the command prints what the function predicts for the same inputs
    want = predict(ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090"), 64, 4)
    assert p["tpot_s"] == pytest.approx(want.tpot_s) and p["ttft_s"] == pytest.approx(want.ttft_s)
    assert p["decode_tok_s"] == pytest.approx(1 / want.tpot_s)


# ---------------------------------------------------------------------------------------------
# SLP and DSLP prefill in the simulator, and the engine's cost model choosing the path
# ---------------------------------------------------------------------------------------------


def test_slp_streaming_floor_and_two_gpus():
    """V3 on the paper's box: SLP can't beat one pass of the experts over PCIe (~12 s on one
    5090), two GPUs each stream half."""
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    one = predict(cfg, hw, 8192, 2, prefill="slp", devices=1)
    two = predict(cfg, hw, 8192, 2, prefill="slp", devices=2)
    assert one.prefill == "slp" and one.devices == 1 and two.devices == 2
    assert one.ttft_s > 58 * 257 * 44e6 / 53e9 * 0.98
    assert 1.5 < one.ttft_s / two.ttft_s <= 2.0
    # DSLP's exchange (each GPU receives half the chunk's hidden states and half its summed
    # outputs, float32) shares each GPU's link with the stream: on a stream-bound prompt both
    # pass over it, so the time covers half the experts plus the exchange
    stream = 58 * 128.5 * 44e6 / 53e9
    exchange = 58 * 2 * 8192 * 7168 * 4 / 2 / 53e9
    assert two.ttft_s > (stream + exchange) * 0.98


def test_device_matmul_precision_is_the_profiles():
    """The profile says which precision SLP's expert matmuls run in: BF16 after dequantization
    (expert_tflops, the engine's default), or FP8 experts on the FP8 tensor cores at
    fp8_expert_tflops (REFMOE_SLP_MATMUL=scaled_mm), which 4-bit experts never take."""
    fp8_v3 = {**V3, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    mx_v3 = {**V3, "quantization_config": {"quant_method": "mxfp4"}}
    hw = Hardware.load("paper-2x9355-2x5090")
    fast = dataclasses.replace(
        hw, gpus=[dataclasses.replace(g, fp8_expert_tflops=400.0) for g in hw.gpus]
    )
    runs = {}
    for name, doc in (("fp8", fp8_v3), ("mxfp4", mx_v3)):
        cfg = ModelConfig.from_dict(doc)
        runs[name] = [predict(cfg, h, 32768, 2, prefill="slp", devices=1) for h in (hw, fast)]
    bf16, fp8 = runs["fp8"]
    assert fp8.ttft_s < 0.9 * bf16.ttft_s  # the experts' matmuls are a third of it here
    assert bf16.device_matmuls.startswith("experts BF16 at 105 TFLOP/s (stored fp8")
    assert fp8.device_matmuls.startswith("experts FP8 at 400 TFLOP/s")
    a, b = runs["mxfp4"]
    assert a.ttft_s == b.ttft_s and b.device_matmuls.startswith("experts BF16")
    assert "attention BF16 at 146 TFLOP/s" in fp8.device_matmuls
    assert predict(ModelConfig.from_dict(V3), hw, 64, 2).device_matmuls.startswith("experts")
    cpu_only = Hardware.load("zen3-2vcpu-calibrated")
    assert predict(ModelConfig.from_dict(V3), cpu_only, 64, 2).device_matmuls == ""
    import yaml

    doc = yaml.safe_load(
        Path(sim.__file__).parent.joinpath("profiles/paper-2x9355-2x5090.yaml").read_text()
    )
    doc["gpus"][1]["fp8_expert_tflops"] = -1
    with pytest.raises(ValueError, match=r"gpus\[1\]\.fp8_expert_tflops must be >= 0"):
        Hardware.from_dict(doc)


def test_auto_prefill_follows_the_cost_model():
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    assert predict(cfg, hw, 64, 2, prefill="auto").prefill == "cpu"
    long = predict(cfg, hw, 32768, 2, prefill="auto")
    assert long.prefill == "slp" and long.devices == 2
    cpu = predict(cfg, hw, 32768, 2, prefill="cpu")
    assert long.ttft_s < cpu.ttft_s


def test_slp_without_a_gpu_streams_to_the_cpu():
    """A profile without a GPU runs SLP as the engine does there: the CPU is the device.
    Per MoE layer the compute lane dequantizes the layer's streamed experts and runs their
    matmuls on every core (CPU.slp_rates), while the loader's copy runs a layer ahead, so
    with a fast copy each rate adds exactly its own term to the first token's time."""
    cfg = ModelConfig.from_dict(V3)
    hw = Hardware.load("zen3-2vcpu-calibrated")
    hw.cpu.slp_copy_gbps, hw.cpu.slp_dequant_gbps, hw.cpu.slp_gflops = 1e6, 0.5, 100.0
    base = predict(cfg, hw, 4096, 2, prefill="slp")
    assert (base.prefill, base.devices) == ("slp", 1)
    layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    flops = costmodel.expert_flops(cfg, 4096)  # one layer's, every token's top-k and shared
    hw.cpu.slp_gflops = 50.0
    slower = predict(cfg, hw, 4096, 2, prefill="slp")
    assert slower.ttft_s - base.ttft_s == pytest.approx(
        layers * flops * (1 / 50e9 - 1 / 100e9), rel=1e-6
    )
    # 4096 tokens hit every expert: the whole layer is streamed and dequantized
    streamed = (cfg.n_routed_experts + cfg.n_shared_experts) * costmodel.expert_bytes(cfg)
    hw.cpu.slp_gflops, hw.cpu.slp_dequant_gbps = 100.0, 0.25
    assert predict(cfg, hw, 4096, 2, prefill="slp").ttft_s - base.ttft_s == pytest.approx(
        layers * streamed * (1 / 0.25e9 - 1 / 0.5e9), rel=1e-6
    )
    with pytest.raises(ValueError, match="no GPU"):
        predict(cfg, hw, 4096, 2, prefill="slp", devices=2)
    with pytest.raises(ValueError, match="has 2 GPUs"):
        predict(cfg, Hardware.load("paper-2x9355-2x5090"), 4096, 2, prefill="slp", devices=3)


def test_auto_without_a_gpu_chooses_as_the_engine():
    """prefill auto on a CPU-only profile: the engine's cost model over the profile's rates
    (the CPU kernels against SLP on the CPU) picks the path, in predict and in the serving
    simulator's policy alike: the CPU for a short prompt; SLP for a long one when its lanes
    are fast, the CPU when they are slow."""
    from refmoe.policy import EngineConfig
    from sim.predict import rates
    from sim.serve import policy_for

    cfg = ModelConfig.from_dict(V3)
    hw = Hardware.load("zen3-2vcpu-calibrated")
    hw.cpu.slp_copy_gbps, hw.cpu.slp_dequant_gbps, hw.cpu.slp_gflops = 20.0, 50.0, 400.0
    policy = policy_for(cfg, hw, EngineConfig(prefill="auto"))
    for tokens, want in ((16, "cpu"), (8192, "slp")):
        chosen = costmodel.choose_prefill(cfg, tokens, rates(hw, 1), 8192).path
        assert chosen == want == policy.path(tokens)
        assert predict(cfg, hw, tokens, 2, prefill="auto").prefill == want
    hw.cpu.slp_gflops = 1.0  # a matmul lane this slow never wins
    assert predict(cfg, hw, 8192, 2, prefill="auto").prefill == "cpu"
    assert policy_for(cfg, hw, EngineConfig(prefill="auto")).path(8192) == "cpu"


# ---------------------------------------------------------------------------------------------
# Many requests: the engine's scheduler, timed by the simulator
# ---------------------------------------------------------------------------------------------


def test_attention_cost_grows_with_the_context():
    """Without a GPU each decode step pays the calibrated cost per cached token in every layer
    and a prompt its scores at the calibrated rate; with one, the cache is read from HBM."""
    cfg = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    hw = Hardware.load("zen3-2vcpu-calibrated")
    flat = predict(cfg, hw, 1000, 3)
    hw.cpu.attention_us_by_context = {0: 0.0, 200: 1000.0, 400: 30000.0}  # 145 us past 400
    hw.cpu.attention_gflops = 40.0
    grown = predict(cfg, hw, 1000, 3)
    layers = cfg.num_hidden_layers
    # the middle step has 1001 tokens cached
    assert grown.tpot_s - flat.tpot_s == pytest.approx(
        layers * (30000 + 601 * 145) * 1e-6, rel=1e-9
    )
    assert hw.cpu.attention_us(100) == 500.0 and hw.cpu.attention_us(-1) == 0.0
    scores = (  # causal from position 0: the flash kernel skips the hidden blocks
        2
        * cfg.num_attention_heads
        * 1000
        * 500.5
        * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    )
    default = 0.5 * 2 * hw.cpu.fma_gflops_per_core * 1e9  # uncalibrated: half the FMA peak
    assert grown.ttft_s - flat.ttft_s == pytest.approx(
        layers * (scores / 40e9 - scores / default), rel=1e-9
    )
    v3, box = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    short, long = predict(v3, box, 64, 3), predict(v3, box, 32768, 3, prefill="slp")
    g = box.gpus[0]
    cache = 61 * 32769 * 576 * 2 / (g.hbm_gbps * g.hbm_efficiency * 1e9)  # the latent, BF16
    assert long.tpot_s - short.tpot_s == pytest.approx(cache * (1 - 65 / 32769), rel=1e-6)
    with pytest.raises(ValueError, match="attention_us_by_context"):
        Hardware.from_dict(
            {
                "name": "x",
                "cpu": {
                    "sockets": 1,
                    "cores_per_socket": 2,
                    "dram_gbps_per_socket": 10,
                    "attention_us_by_context": {64: -1},
                },
            }
        )


def test_slp_in_chunks_with_the_engines_context_split(monkeypatch):
    """SLP as the engine runs it: a prompt longer than a chunk (32,768 tokens on CUDA) streams
    the experts once per chunk; with two GPUs each takes the engine's context-parallel slice
    (costmodel.context_split), which balances their causal attention: at 32K on the paper's
    box that beats equal slices, whose second GPU would carry 3/4 of the scores."""
    from refmoe import costmodel

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    chunk = costmodel.SLP_CHUNK_TOKENS["cuda"]
    one = predict(cfg, hw, chunk, 2, prefill="slp", devices=1).ttft_s
    longer = predict(cfg, hw, chunk + 2048, 2, prefill="slp", devices=1).ttft_s
    # a second pass over every expert over PCIe (2,048 tokens hit them all)
    stream = (
        costmodel.moe_layers(cfg)
        * (cfg.n_routed_experts + cfg.n_shared_experts)
        * costmodel.expert_bytes(cfg)
        / (hw.gpus[0].pcie_gbps * 1e9)
    )
    assert longer - one > 0.95 * stream
    balanced = predict(cfg, hw, chunk, 2, prefill="slp", devices=2).ttft_s
    monkeypatch.setattr(
        costmodel,
        "context_split",
        lambda cfg, t, r, past=0: [t // r + (k < t % r) for k in range(r)],
    )
    equal = predict(cfg, hw, chunk, 2, prefill="slp", devices=2).ttft_s
    assert balanced < 0.85 * equal and one / balanced > 1.8 and one / equal < 1.6


def test_spec_sheet_profiles_load_and_rank():
    """The Xeon 8480+ / RTX 4090 box, the H100 box and the paper's box, from spec sheets:
    decode is bound by the CPU's DRAM (the Xeons' 8 channels against the EPYCs' 12), long
    prefill by PCIe (4.0 on the 4090) and GPU FLOPs."""
    cfg = ModelConfig.from_dict(V3)
    p = {
        n: (
            predict(cfg, Hardware.load(n), 32768, 4, prefill="slp", devices=1),
            predict(cfg, Hardware.load(n), 32, 4),
        )
        for n in ("xeon8480-2s-4090", "h100-box-2x8480", "paper-2x9355-2x5090")
    }
    assert (
        p["paper-2x9355-2x5090"][1].tpot_s
        < p["h100-box-2x8480"][1].tpot_s
        < p["xeon8480-2s-4090"][1].tpot_s
    )
    assert (
        p["h100-box-2x8480"][0].ttft_s
        < p["paper-2x9355-2x5090"][0].ttft_s
        < p["xeon8480-2s-4090"][0].ttft_s
    )
    # PCIe 4.0 at 25 GB/s: a pass over V3's experts takes at least 26 s
    assert p["xeon8480-2s-4090"][0].ttft_s > 58 * 11.3e9 / 25e9


def test_routing_skew():
    """A Zipf-like routing distribution: probabilities sum to top-k, none above 1; decode
    reads top-k experts either way; SLP streams only the experts a prompt routes to, fewer
    when routing is skewed."""
    from sim.predict import routing_bins

    bins = routing_bins(256, 8, 1.2)
    assert sum(c for c, _ in bins) == 256 and sum(c * p for c, p in bins) == pytest.approx(8)
    ps = [p for _, p in bins]
    assert all(0 < p <= 1 for p in ps) and ps == sorted(ps, reverse=True)
    assert routing_bins(256, 8) == [(256, 8 / 256)]
    with pytest.raises(ValueError, match="skew"):
        routing_bins(256, 8, -1.0)
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    assert predict(cfg, hw, 16, 4, routing_skew=1.2).tpot_s == pytest.approx(
        predict(cfg, hw, 16, 4).tpot_s, rel=1e-9
    )
    assert (
        predict(cfg, hw, 64, 2, prefill="slp", devices=1, routing_skew=1.2).ttft_s
        < 0.8 * predict(cfg, hw, 64, 2, prefill="slp", devices=1).ttft_s
    )


def test_other_model_configs():
    """Costs from any config the engine loads: Kimi-K2 (V3's layout, 384 experts, 64 heads)
    and Qwen3-235B-A22B (GQA, 128 experts, no shared expert): bytes per token as their
    active parameters say (32B and 22B, FP8), decode bound by them."""
    from sim.paper import KIMI_K2

    hw = Hardware.load("paper-2x9355-2x5090")
    k2 = predict(ModelConfig.from_dict(KIMI_K2), hw, 32, 8)
    q3 = predict(
        ModelConfig.from_dict(
            dict(
                architectures=["Qwen3MoeForCausalLM"],
                vocab_size=151936,
                hidden_size=4096,
                intermediate_size=12288,
                moe_intermediate_size=1536,
                num_hidden_layers=94,
                num_attention_heads=64,
                num_key_value_heads=4,
                head_dim=128,
                num_experts=128,
                num_experts_per_tok=8,
                norm_topk_prob=True,
            )
        ),
        hw,
        32,
        8,
    )
    assert 30e9 < k2.bytes_per_token < 33e9 and 20e9 < q3.bytes_per_token < 23e9
    assert abs(k2.decode_tok_s - 22.4) / 22.4 < 0.10  # the paper's Kimi-K2 figure
    assert q3.decode_tok_s > k2.decode_tok_s


def test_profile_new_from_a_spec_sheet(tmp_path, capsys):
    """`refmoe-sim profile new`: the paper's box from its spec sheet gives a valid profile whose
    DRAM peak and PCIe rates are the hand-computed ones, and predict runs on it."""
    out = tmp_path / "box.yaml"
    args = [
        "profile",
        "new",
        "--name",
        "box",
        "--out",
        str(out),
        "--sockets",
        "2",
        "--cores-per-socket",
        "32",
        "--channels",
        "12",
        "--mts",
        "6400",
        "--interconnect-gbps",
        "512",
        "--gpu",
        "RTX5090,1792,5,209",
    ]
    from sim import cli

    assert cli.main(args) == 0
    hw = Hardware.load(out)
    assert hw.cpu.dram_gbps_per_socket == 12 * 6400 * 8 / 1000  # 614.4 GB/s
    assert hw.gpus[0].pcie_gbps == pytest.approx(0.8 * 64)  # PCIe 5.0 x16, pinned copies
    assert hw.gpus[0].expert_tflops == pytest.approx(104.5)
    p = predict(ModelConfig.from_dict(V3), hw, 1024, 8)
    assert p.ttft_s > p.tpot_s
    assert cli.main(args[:-4]) != 0  # two sockets, no socket link: named, no traceback
    assert "interconnect_gbps must be > 0 with 2 sockets" in capsys.readouterr().err


def test_4bit_experts_are_counted_as_stored_and_run_at_their_rate():
    """Kimi-K2-Thinking (compressed-tensors INT4, group 32): a routed expert is its int32 words
    and bf16 scales, 0.56 of an FP8 one; a profile's calibrated INT4 GEMV efficiency sets its
    decode rate, and a format the profile lacks runs at the FP8 GEMV's rate."""
    import copy
    import dataclasses

    from refmoe import costmodel
    from sim import catalog

    thinking, k2 = catalog.load("kimi-k2-thinking"), catalog.load("kimi-k2")
    assert thinking.expert_format == ("int4g", 32)
    one = 2 * 2048 * (7168 // 8 * 4 + 7168 // 32 * 2) + 7168 * (2048 // 8 * 4 + 2048 // 32 * 2)
    assert costs.routed_expert_bytes(thinking) == costmodel.expert_bytes(thinking) == one
    assert one / costs.routed_expert_bytes(k2) == pytest.approx(0.5625, abs=0.001)
    assert costs.shared_expert_bytes(thinking) == costs.shared_expert_bytes(k2)
    hw = Hardware.load("vm-2vcpu-avx512-2026-12-04-formats")
    assert set(hw.cpu.gemv_efficiency_by_format) == {"mxfp4", "nvfp4", "int4g"}
    slow = copy.deepcopy(hw)
    slow.cpu.gemv_efficiency_by_format["int4g"] /= 2
    fast, halved = (predict(thinking, h, 8, 4).tpot_s for h in (hw, slow))
    assert halved > 1.2 * fast
    none = copy.deepcopy(hw)
    none.cpu.gemv_efficiency_by_format = {}
    assert none.cpu.stream_gbps("int4g") == none.cpu.fp8_stream_gbps()
    bad = dataclasses.asdict(hw.cpu) | {"gemv_efficiency_by_format": {"int4g": 1.5}}
    with pytest.raises(ValueError, match="gemv_efficiency_by_format maps"):
        Hardware.from_dict({"name": "x", "cpu": bad, "gpus": []}, "test")


def test_published_family_configs():
    """The published configs of GLM-4.5(-Air), MiniMax-M2 and gpt-oss (sim/models) load and
    predict: bytes per token as their active parameters say (GLM-4.5 32B active, Air 12B,
    MiniMax-M2 10B, FP8 but for gpt-oss's MXFP4 experts), and gpt-oss's sliding layers cap
    their score cost at the window."""
    from sim import catalog

    hw = Hardware.load("paper-2x9355-2x5090")
    active = {"glm-4.5": 32e9, "glm-4.5-air": 12e9, "minimax-m2": 10e9}
    for name, params in active.items():
        cfg = catalog.load(name)
        got = predict(cfg, hw, 32, 8).bytes_per_token
        assert 0.85 * params < got < 1.15 * params, (name, got)
    oss = catalog.load("gpt-oss-120b")
    assert oss.family == "gpt_oss" and oss.expert_format == ("mxfp4", 32)
    assert oss.window(0) == 128 and oss.window(1) == 0
    # 5.1B active: about 4.2B of it in MXFP4 experts (0.53 bytes each), the rest FP8
    assert 2.5e9 < predict(oss, hw, 32, 8).bytes_per_token < 4e9
    # scores: half the layers see at most 128 keys, so long contexts cost about half of full
    full = dataclasses.replace(oss, layer_types=[])
    at_64k = costs.score_flops(oss, 1, 65536) / costs.score_flops(full, 1, 65536)
    assert 0.5 <= at_64k < 0.501
    assert costs.score_flops(oss, 8, 0) == costs.score_flops(full, 8, 0)  # inside the window


@pytest.mark.parametrize(
    "tokens,past,window", [(1, 0, 4), (5, 0, 4), (3, 2, 4), (7, 9, 4), (9, 1, 4)]
)
def test_attended_keys_counts_each_token(tokens, past, window):
    brute = sum(min(p + 1, window) for p in range(past, past + tokens))
    assert costs.attended_keys(tokens, past, window) == brute
    assert costs.attended_keys(tokens, past, 0) == sum(p + 1 for p in range(past, past + tokens))


def test_dsa_scores_cap_at_the_top_k():
    """DeepSeek-V3.2 (sim/models/deepseek-v3.2): MLA scores only index_topk keys per token,
    its indexer every key; below the top-k it costs V3's scores plus the indexer's."""
    from refmoe import costmodel
    from sim import catalog

    v3, v32 = catalog.load("deepseek-v3"), catalog.load("deepseek-v3.2")
    assert v32.is_dsa and v32.index_topk == 2048
    per_key = 2.0 * v3.num_attention_heads * costmodel.score_dims(v3)
    indexer = 2.0 * v32.index_n_heads * v32.index_head_dim
    short = costs.score_flops(v32, 1, 1000)
    assert short == pytest.approx(costs.score_flops(v3, 1, 1000) + indexer * 1001)
    assert costs.score_flops(v32, 1, 65536) == pytest.approx(per_key * 2048 + indexer * 65537)
    # the indexer (64 x 128 a key) is then most of it: a quarter of dense MLA at 64K
    assert costs.score_flops(v32, 1, 65536) < 0.25 * costs.score_flops(v3, 1, 65536)
    assert costs.attention_bytes(v32) > costs.attention_bytes(v3)  # the indexer's weights
    hw = Hardware.load("paper-2x9355-2x5090")
    assert predict(v32, hw, 32768, 8).ttft_s < predict(v3, hw, 32768, 8).ttft_s


def test_linear_attention_decode_is_nearly_flat_in_context():
    """Qwen3.5-35B-A3B as published (3 of 4 layers Gated DeltaNet): with attention on a GPU,
    decode after 128K cached tokens costs little more than after 2K, because only its
    full-attention layers read a cache, while the same model with every layer full attention
    grows far more. On a CPU-only box (the VM's calibrated torch attention) the full layers'
    scores at 128K still dominate, but the growth is well under half the dense model's. Its KV
    per token is the full layers' alone, its fixed state counted apart."""
    from refmoe.config import ModelConfig as MC
    from sim.catalog import resolve

    hybrid = MC.from_file(resolve("qwen3.5-35b-a3b"))
    dense = dataclasses.replace(hybrid, layer_types=["full_attention"] * hybrid.num_hidden_layers)
    assert costs.kv_bytes_per_token(hybrid) * 4 == costs.kv_bytes_per_token(dense)
    # 30 linear layers: state 32 x 128 x 128 floats and 3 x 8192 BF16 conv inputs each
    assert costs.state_bytes(hybrid) == 30 * (4 * 32 * 128 * 128 + 2 * 8192 * 3)
    assert costs.state_bytes(dense) == 0
    for profile, gpu in (("xeon8480-2s-4090", True), ("vm-2vcpu-avx512-2026-12-04", False)):
        hw = Hardware.load(profile)

        def growth(cfg, hw=hw):
            short = predict(cfg, hw, 2048, 16).tpot_s
            return predict(cfg, hw, 131072, 16).tpot_s / short

        flat, grows = growth(hybrid), growth(dense)
        assert not gpu or flat < 1.3, (profile, flat)
        assert flat - 1 < 0.5 * (grows - 1), (profile, flat, grows)


def test_linear_attention_state_is_reserved_by_the_simulated_scheduler():
    """refmoe-sim serve reserves each request's fixed state in the KV budget as the engine
    does: a budget that holds two requests' tokens but not their states runs them one after
    the other; one that holds both states runs them together."""
    from refmoe.config import ModelConfig as MC
    from refmoe.policy import fixed_state_tokens
    from sim.catalog import resolve
    from sim.serve import Simulation

    cfg = MC.from_file(resolve("qwen3.5-35b-a3b"))
    per = costs.kv_bytes_per_token(cfg) * cfg.num_hidden_layers
    state = fixed_state_tokens(costs.state_bytes(cfg), per)
    assert state == 3144  # 64.4 MB of state against 20 KB a token
    hw, reqs = Hardware.load("xeon8480-2s-4090"), [(0.0, 64, 8), (0.0, 64, 8)]
    tight = Simulation(cfg, hw, reqs, kv_tokens=2 * 72 + state).run().outcomes
    assert tight[1].ttft_s > tight[0].e2e_s  # waited for the first one's state to return
    room = Simulation(cfg, hw, reqs, kv_tokens=2 * (72 + state)).run().outcomes
    assert room[1].ttft_s < room[0].e2e_s


def test_fp8_scales_counted_per_their_block():
    """An FP8 release whose scales are per output channel (compressed-tensors float-quantized,
    llm-compressor's FP8_DYNAMIC) reads its codes and one float32 per row: the simulator counts
    those bytes, as the engine's loaded model does, and predicts as for DeepSeek's blocks."""
    import dataclasses

    from refmoe import costmodel
    from refmoe.convert import fp8_quantization_config
    from refmoe.kernels import formats
    from sim import catalog

    base = catalog.load("qwen3-30b-a3b")
    channel = dataclasses.replace(
        base, quantization=fp8_quantization_config("compressed-tensors", (1, formats.WHOLE))
    )
    assert channel.is_fp8 and channel.fp8_block == (1, formats.WHOLE)
    h, i = base.hidden_size, base.moe_intermediate_size
    assert costmodel.expert_bytes(channel) == 2 * (i * h + 4 * i) + h * i + 4 * h
    blocks = 4 * (2 * -(-i // 128) * -(-h // 128) + -(-h // 128) * -(-i // 128))
    assert costmodel.expert_bytes(base) == 3 * h * i + blocks
    hw = Hardware.load("vm-2vcpu-avx512-2026-12-04-formats")
    a, b = (predict(c, hw, 256, 4) for c in (base, channel))
    assert b.tpot_s == pytest.approx(a.tpot_s, rel=0.02)


def test_deepseek_v4_flash_decode_stays_flat_in_context():
    """DeepSeek-V4-Flash (sim/models: transformers' V4 defaults, the release's FP8 + FP4
    quantization): a token reads its FP8 projections, compressors and indexers (averaged over
    CSA / HCA layers) and six FP4 routed experts plus the FP8 shared one; its attention sees a
    128-token window and compressed entries, so decode at 128K costs nearly what it costs at
    2K, where DeepSeek-V3's MLA reads every cached latent."""
    from refmoe import costmodel
    from sim import catalog

    v4 = catalog.load("deepseek-v4-flash")
    assert v4.family == "deepseek_v4" and v4.expert_format == ("mxfp4", 32)
    h, i = v4.hidden_size, v4.moe_intermediate_size
    fp4 = 3 * h * (i // 32 * 17)  # MXFP4: 16 bytes of codes and one scale per 32
    assert costs.routed_expert_bytes(v4) == 2 * i * (h // 32 * 17) + h * (i // 32 * 17) == fp4
    per_layer = costs.attention_bytes(v4) + costs.expert_bytes(v4)
    assert 150e6 < per_layer < 300e6  # ~100 MB of FP8 attention, ~105 MB of experts
    hw = Hardware.load("paper-2x9355-2x5090")
    tpot = {c: predict(v4, hw, c, 16).tpot_s for c in (2048, 131072)}
    assert tpot[131072] < 1.1 * tpot[2048]
    v3 = ModelConfig.from_dict(V3)
    dense = {c: predict(v3, hw, c, 16).tpot_s for c in (2048, 131072)}
    assert dense[131072] / dense[2048] > tpot[131072] / tpot[2048]
    assert costmodel.attention_shapes(v4)[:5] == [
        (1024, 4096),
        (64 * 512, 1024),
        (512, 4096),
        (8 * 1024, 64 * 512 // 8),
        (4096, 8 * 1024),
    ]
