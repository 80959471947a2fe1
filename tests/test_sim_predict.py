"""Cost model, profiles, the single-request prediction, and validation on the measured trace."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from refmoe.config import ModelConfig
from sim import costs
from sim.hardware import Hardware
from sim.predict import predict, unique_experts
from sim.validate import validate

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "demo-avx2-L4-E32-2threads.json"
V3 = dict(
    architectures=["DeepseekV3ForCausalLM"],
    vocab_size=129280,
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    num_experts_per_tok=8,
    n_shared_experts=1,
    first_k_dense_replace=3,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=163840,
    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
)


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


def test_validate_on_the_measured_trace():
    r = validate(TRACE, Hardware.load(ROOT / "sim" / "profiles" / "zen3-2vcpu-calibrated.yaml"))
    tpot = r["metrics"]["tpot_s"]
    assert tpot["measured"] == pytest.approx(0.0827, rel=0.01)
    assert abs(tpot["error"]) < 0.05  # the target for TPOT
    assert abs(r["metrics"]["ttft_s"]["error"]) < 0.5  # prefill is modelled crudely (docs)


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
    assert p["tpot_s"] > 0 and p["ttft_s"] > p["tpot_s"]


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


def test_auto_prefill_follows_the_cost_model():
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    assert predict(cfg, hw, 64, 2, prefill="auto").prefill == "cpu"
    long = predict(cfg, hw, 32768, 2, prefill="auto")
    assert long.prefill == "slp" and long.devices == 2
    cpu = predict(cfg, hw, 32768, 2, prefill="cpu")
    assert long.ttft_s < cpu.ttft_s


def test_slp_needs_a_gpu():
    cfg = ModelConfig.from_dict(V3)
    with pytest.raises(ValueError, match="needs a GPU"):
        predict(cfg, Hardware.load("zen3-2vcpu-calibrated"), 4096, 2, prefill="slp")
    with pytest.raises(ValueError, match="has 2 GPUs"):
        predict(cfg, Hardware.load("paper-2x9355-2x5090"), 4096, 2, prefill="slp", devices=3)


# ---------------------------------------------------------------------------------------------
# Many requests: the engine's scheduler, timed by the simulator
# ---------------------------------------------------------------------------------------------


def test_serving_simulation_uses_the_engine_scheduler():
    from refmoe.serving_metrics import summary
    from sim.serve import simulate

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    lone, _ = simulate(cfg, hw, [(0.0, 32, 9)])
    p = predict(cfg, hw, 32, 9)
    assert lone[0].ok and lone[0].output_tokens == 9
    assert lone[0].ttft_s == pytest.approx(p.ttft_s, rel=1e-6)  # same cost model alone
    # its 8 decode steps ran as one fast-forward, at the times of 8 separate steps (each a
    # little longer than the last, as the cache grows by a token)
    itl = lone[0].itl_s
    assert sorted(itl)[4] == pytest.approx(p.tpot_s, rel=1e-9)
    assert all(a < b for a, b in zip(itl, itl[1:])) and itl[-1] < itl[0] * 1.01
    # two requests at once decode together: each step costs less than two lone steps
    pair, _ = simulate(cfg, hw, [(0.0, 32, 9), (0.0, 32, 9)])
    tpot = lambda o: (o.e2e_s - o.ttft_s) / (o.output_tokens - 1)  # noqa: E731
    assert all(o.ok for o in pair) and tpot(pair[1]) < 2 * tpot(lone[0])
    # a burst queues for the prefill worker: later arrivals wait longer for their first token
    burst, dur = simulate(cfg, hw, [(0.0, 512, 4)] * 6, max_batch=2)
    ttfts = [o.ttft_s for o in burst]
    assert ttfts == sorted(ttfts) and ttfts[-1] > 5 * ttfts[0]
    res = summary(burst, dur)
    assert res["completed"] == 6 and res["total_output_tokens"] == 24


def test_serving_validation_on_the_measured_serve_trace():
    r = validate(
        ROOT / "traces" / "serve-demo-avx2-L4-E32.json", Hardware.load("zen3-2vcpu-calibrated")
    )
    assert r["requests"] == 12
    assert set(r["metrics"]) == {"ttft_s", "tpot_s", "e2e_s", "output_tok_s"}
    for m in r["metrics"].values():
        assert m["predicted"] > 0 and m["measured"] > 0


def test_sim_serve_cli_prints_the_block(tmp_path):
    csv = tmp_path / "req.csv"
    csv.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,16,4\n0.5,32,8\n")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(V3))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.cli",
            "serve",
            "--model",
            str(cfg),
            "--hardware",
            "paper-2x9355-2x5090",
            "--csv",
            str(csv),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "Serving Benchmark Result" in out and "Successful requests:" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.cli",
            "serve",
            "--model",
            str(cfg),
            "--hardware",
            "paper-2x9355-2x5090",
            "--csv",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "bad.csv" in r.stderr
    # --interval on a profile pooled from three calibrations: every figure's 90% interval,
    # the bootstrap times the drift between its runs, in the JSON and under the block
    demo = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    small = tmp_path / "demo.json"
    small.write_text(
        json.dumps(
            {
                "architectures": ["DeepseekV3ForCausalLM"],
                **{k: v for k, v in asdict(demo).items() if k not in ("architecture", "family")},
            }
        )
    )
    argv = [
        sys.executable,
        "-m",
        "sim.cli",
        "serve",
        "--model",
        str(small),
        "--hardware",
        "zen3-2vcpu-3runs",
        "--csv",
        str(csv),
        "--interval",
        "5",
    ]
    got = json.loads(
        subprocess.run(
            argv + ["--json"], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    )
    band = got["interval_90"]
    assert set(band) == {
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "median_tpot_ms",
        "p99_tpot_ms",
        "output_throughput",
        "request_throughput",
    }
    assert all(0 < lo < hi for lo, hi in band.values())
    assert band["mean_ttft_ms"][0] < got["mean_ttft_ms"] < band["mean_ttft_ms"][1]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Serving Benchmark Result" in text and "drift between 3 calibrations" in text
    # SLOs: the share of requests within both, and the goodput; a TTFT SLO between the two
    # requests' TTFTs is met by one of them
    base = [
        sys.executable,
        "-m",
        "sim.cli",
        "serve",
        "--model",
        str(small),
        "--hardware",
        "zen3-2vcpu-3runs",
        "--csv",
        str(csv),
        "--json",
    ]
    loose = json.loads(
        subprocess.run(
            base + ["--slo-ttft", "1000", "--slo-tpot", "10"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    assert loose["slo_attainment"] == 1.0
    assert loose["goodput_req_s"] == pytest.approx(loose["request_throughput"])
    mid = (loose["median_ttft_ms"] + loose["p99_ttft_ms"]) / 2e3
    half = json.loads(
        subprocess.run(
            base + ["--slo-ttft", str(mid)], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    )
    assert half["slo_attainment"] == 0.5
    shown = subprocess.run(
        base[:-1] + ["--slo-ttft", str(mid), "--slo-tpot", "10"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "SLO attainment:" in shown and "Request goodput (req/s):" in shown


def test_reproduce_paper_rows():
    from sim.paper import format_rows, reproduce

    rows = reproduce()
    assert len(rows) == 10 and all(r["predicted"] > 0 for r in rows)
    by = {r["metric"]: r for r in rows}
    assert by["decode tok/s, FP8"]["within_10pct"]
    assert by["TTFT s, 45K prompt, two 5090s"]["kind"] == "about"
    text = format_rows(rows)
    assert "decode tok/s, FP8" in text and "met" in text.splitlines()[0]
    out = subprocess.run(
        [sys.executable, "-m", "sim.cli", "reproduce-paper", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert [r["metric"] for r in json.loads(out)] == [r["metric"] for r in rows]


def test_sweep_in_processes_with_plots(tmp_path):
    from sim import sweep

    cfg = ModelConfig.from_dict(V3)
    rows = sweep.sweep_lengths(
        cfg,
        ["paper-2x9355-2x5090", "zen3-2vcpu-calibrated"],
        ["cpu", "slp", "auto"],
        [256, 32768],
        workers=2,
    )
    assert len(rows) == 12
    skipped = [r for r in rows if "skipped" in r]
    assert len(skipped) == 4 and all(r["hardware"] == "this-machine" for r in skipped)
    paper = {
        (r["prefill"], r["prompt_tokens"]): r
        for r in rows
        if r["hardware"] == "paper-2x9355-2x5090"
    }
    assert paper[("auto", 256)]["chosen"] == "cpu" and paper[("auto", 32768)]["chosen"] == "slp"
    assert paper[("auto", 32768)]["ttft_s"] < paper[("cpu", 32768)]["ttft_s"]
    sweep.plot(rows, str(tmp_path / "ttft.png"))
    rates = sweep.sweep_rates(
        cfg,
        ["paper-2x9355-2x5090"],
        ["cpu", "auto"],
        [0.01, 0.2],
        20,
        (256, 2048),
        (16, 64),
        20.0,
        0.1,
        workers=1,
    )
    assert all(0 <= r["slo_attainment"] <= 1 for r in rates)
    by = {(r["prefill"], r["request_rate"]): r["slo_attainment"] for r in rates}
    assert by[("auto", 0.01)] >= by[("auto", 0.2)]
    sweep.plot(rates, str(tmp_path / "slo.png"))
    for name in ("ttft.png", "slo.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "profile, ttft_tol, tpot_tol",
    [("zen3-2vcpu-b2b-before", 0.10, 0.05), ("zen3-2vcpu-b2b-after", 0.10, 0.10)],
)
def test_serving_validation_calibrated_back_to_back(profile, ttft_tol, tpot_tol):
    """A served workload measured between two calibrations of this machine: within the
    issue's targets with the calibration taken just before (TPOT 5%, TTFT 10%)."""
    r = validate(ROOT / "traces" / "serve-demo-avx2-L4-E32-b2b.json", Hardware.load(profile))
    assert abs(r["metrics"]["ttft_s"]["error"]) <= ttft_tol
    assert abs(r["metrics"]["tpot_s"]["error"]) <= tpot_tol


def test_simulated_trace_has_the_engine_lanes():
    from sim.serve import simulate

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    outcomes, _, tr = simulate(cfg, hw, [(0.0, 64, 5), (0.5, 32, 3)], trace=True)
    doc = tr.to_json()
    lanes = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert lanes == {"prefill worker", "decode worker"}
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert sum(e["name"] == "prefill" for e in spans) == 2
    assert sum(e["args"]["requests"] for e in spans if e["name"] == "decode") == 4 + 2
    reqs = sorted(doc["metadata"]["requests"], key=lambda r: r["arrival"])
    assert [r["output_tokens"] for r in reqs] == [5, 3] and doc["metadata"]["simulated"]
    assert reqs[0]["first_token_time"] == pytest.approx(outcomes[0].ttft_s)


@pytest.mark.parametrize(
    "profile, prefill",
    [
        ("zen3-2vcpu-calibrated", "cpu"),
        ("paper-2x9355-2x5090", "slp"),
        ("paper-2x9355-2x5090", "cpu"),
    ],
)
def test_decode_blocks_beside_a_prefill_keep_every_time(profile, prefill):
    """Decode steps taken in blocks beside a running prefill (the prefill held to the rate it
    gets beside them) give the times of step-by-step flows."""
    from sim.serve import simulate

    cfg = (
        ModelConfig.from_dict(V3)
        if profile.startswith("paper")
        else ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    )
    long = 8192 if prefill == "slp" else 256
    reqs = [(0.0, 16, 40), (0.1, long, 6), (0.2, 16, 30), (3.0, long // 2, 4)]
    hw = Hardware.load(profile)
    # every step a little longer than the last
    hw.cpu.attention_us_by_context = {16: 0.0, 64: 3000.0, 1024: 100000.0}
    fast, d1 = simulate(cfg, hw, reqs, prefill=prefill)
    slow, d2 = simulate(cfg, hw, reqs, prefill=prefill, blocks=False)
    assert d1 == pytest.approx(d2, rel=1e-6)
    for a, b in zip(fast, slow):
        assert a.ok and b.ok and a.ttft_s == pytest.approx(b.ttft_s, rel=1e-6)
        assert a.itl_s == pytest.approx(b.itl_s, rel=1e-6, abs=1e-9)


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
    scores = (
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


def test_contention_decode_beside_slp_and_numa():
    """The links are shared: decode beside an SLP prefill on the other GPU loses only the DRAM
    the stream's DMA reads take (a few percent on the paper's box), a CPU prefill beside it
    halves its cores, and a NUMA-unaware layout is held back by the interconnect."""
    from sim.serve import simulate

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    alone, _ = simulate(cfg, hw, [(0.0, 16, 30)])
    tpot = alone[0].itl_s[0]
    mixed, _ = simulate(cfg, hw, [(0.0, 16, 200), (1.0, 16384, 2)], prefill="slp")
    assert 1.0 - 1e-9 <= max(mixed[0].itl_s) / tpot < 1.15
    # with kernels that saturate DRAM on their own, the stream's reads show
    import copy

    tight = copy.deepcopy(hw)
    tight.cpu.fp8_gemv_efficiency = 1.0
    alone, _ = simulate(cfg, tight, [(0.0, 16, 30)])
    mixed, _ = simulate(cfg, tight, [(0.0, 16, 200), (1.0, 16384, 2)], prefill="slp")
    assert 1.01 < max(mixed[0].itl_s) / alone[0].itl_s[0] < 1.15
    cpu, _ = simulate(cfg, hw, [(0.0, 16, 200), (1.0, 4096, 2)], prefill="cpu")
    assert max(cpu[0].itl_s) / tpot > 1.4  # its CPU half doubles

    unaware = copy.deepcopy(hw)
    unaware.cpu.numa_aware = False
    unaware.cpu.interconnect_gbps = 300.0
    assert predict(cfg, unaware, 16, 4).tpot_s > 1.2 * predict(cfg, hw, 16, 4).tpot_s


# ---------------------------------------------------------------------------------------------
# Prediction intervals and the validation summary
# ---------------------------------------------------------------------------------------------


def _with_samples():
    hw = Hardware.load("zen3-2vcpu-calibrated")
    hw.samples = {
        "cpu.dram_gbps_per_socket": [30.0, 33.0, 37.0, 40.0, 45.0],
        "cpu.fp8_gemv_efficiency": [0.78, 0.8, 0.83, 0.86, 0.9],
        "cpu.gemm_gbps_by_m.4": [4.0, 4.5, 5.0, 5.5, 6.0],
    }
    return hw


def test_bootstrap_interval_over_calibration_samples(tmp_path):
    import random

    from sim.interval import bootstrap, resample

    hw = _with_samples()
    b = resample(hw, random.Random(1))
    assert 30.0 <= b.cpu.dram_gbps_per_socket <= 45.0 and 4.0 <= b.get("cpu.gemm_gbps_by_m.4")
    assert hw.cpu.dram_gbps_per_socket == 37.405100337826376  # the original is untouched
    cfg = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    tpot = lambda h: {"tpot_s": predict(cfg, h, 16, 4).tpot_s}  # noqa: E731
    lo, hi = bootstrap(tpot, hw, 100)["tpot_s"]
    fast, slow = _with_samples(), _with_samples()
    fast.cpu.dram_gbps_per_socket, fast.cpu.fp8_gemv_efficiency = 45.0, 0.9
    slow.cpu.dram_gbps_per_socket, slow.cpu.fp8_gemv_efficiency = 30.0, 0.78
    assert tpot(fast)["tpot_s"] <= lo < tpot(hw)["tpot_s"] < hi <= tpot(slow)["tpot_s"]
    # two calibrations that disagree (the machine drifted between them): the interval mixes
    # both, so it reaches from the faster one's interval to the slower one's
    quick, sluggish = _with_samples(), _with_samples()
    for h, f in ((quick, 1.25), (sluggish, 0.8)):
        h.samples = {k: [v * f for v in vs] for k, vs in h.samples.items()}
        h.samples["cpu.fp8_gemv_efficiency"] = hw.samples["cpu.fp8_gemv_efficiency"]
    q_lo, q_hi = bootstrap(tpot, quick, 100)["tpot_s"]
    s_lo, s_hi = bootstrap(tpot, sluggish, 100)["tpot_s"]
    m_lo, m_hi = bootstrap(tpot, [quick, sluggish], 100)["tpot_s"]
    assert q_hi < s_lo  # the two intervals do not meet
    assert q_lo <= m_lo < q_hi and s_lo < m_hi <= s_hi
    # samples survive a save and load; bad ones are refused by name
    hw.save(tmp_path / "p.yaml")
    assert Hardware.load(tmp_path / "p.yaml").samples == hw.samples
    with pytest.raises(ValueError, match="samples.cpu.nope names no field"):
        Hardware.from_dict({**yaml_of(hw), "samples": {"cpu.nope": [1.0]}})
    with pytest.raises(ValueError, match="samples.cpu.moe_overhead_us must be a list"):
        Hardware.from_dict({**yaml_of(hw), "samples": {"cpu.moe_overhead_us": []}})
    with pytest.raises(ValueError, match="no calibration samples"):
        bootstrap(tpot, Hardware.load("paper-2x9355-2x5090"))


def test_interval_allows_for_drift_between_calibrations(tmp_path):
    """Two calibrations of one machine that disagree (it drifted between them): pooled, the
    profile keeps each one's medians in order (runs); the interval then multiplies every
    bootstrap replicate by how far that drift moves the prediction, either way, so it reaches
    beyond both calibrations' own intervals. The runs survive a save; bad ones are named."""
    import random
    import statistics

    from sim.interval import (
        as_run,
        bootstrap,
        drift_pairs,
        drift_ratios,
        pool,
        replicates,
        resample,
    )

    cfg = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    tpot = lambda h: {"tpot_s": predict(cfg, h, 16, 4).tpot_s}  # noqa: E731
    quick, sluggish = _with_samples(), _with_samples()
    for h, f in ((quick, 1.25), (sluggish, 0.8)):
        h.samples = {k: [v * f for v in vs] for k, vs in h.samples.items()}
        h.samples["cpu.fp8_gemv_efficiency"] = [0.78, 0.8, 0.83, 0.86, 0.9]
        for k, vs in h.samples.items():
            h.set(k, statistics.median(vs))
    both = pool([quick, sluggish], "both")
    assert len(both.runs) == 2 and not (quick.runs or sluggish.runs)
    assert both.runs[0]["cpu.dram_gbps_per_socket"] == quick.cpu.dram_gbps_per_socket
    first = as_run(both, both.runs[1])
    assert first.get("cpu.gemm_gbps_by_m.4") == sluggish.get("cpu.gemm_gbps_by_m.4")
    assert not first.samples and not first.runs
    # a pooled profile of pooled profiles keeps every run, in order
    assert len(pool([both, quick]).runs) == 3
    ((earlier, later),) = drift_pairs([both])
    r = tpot(later)["tpot_s"] / tpot(earlier)["tpot_s"]
    assert r > 1.3  # the sluggish run decodes slower
    assert drift_ratios(tpot, [(earlier, later)]) == [{"tpot_s": r}, {"tpot_s": 1 / r}]
    plain = bootstrap(tpot, both, 60, drift=[])["tpot_s"]
    lo, hi = bootstrap(tpot, both, 60)["tpot_s"]  # drift from its own runs
    assert (lo, hi) == bootstrap(tpot, both, 60, drift=[(earlier, later)])["tpot_s"]
    med = statistics.median(x["tpot_s"] for x in replicates(tpot, both, 60))
    assert lo <= med / r and hi >= med * r and lo < plain[0] and hi > plain[1]
    # the same drift named for a profile of one calibration
    one = bootstrap(tpot, quick, 60, drift=[(earlier, later)])["tpot_s"]
    q_lo, q_hi = bootstrap(tpot, quick, 60)["tpot_s"]
    assert one[0] < q_lo and one[1] > q_hi
    assert resample(both, random.Random(0)).runs == both.runs
    both.save(tmp_path / "p.yaml")
    assert Hardware.load(tmp_path / "p.yaml").runs == both.runs
    with pytest.raises(ValueError, match=r"runs\[1\].cpu.nope names no field"):
        Hardware.from_dict({**yaml_of(both), "runs": [both.runs[0], {"cpu.nope": 1.0}]})
    with pytest.raises(ValueError, match=r"runs\[0\].cpu.moe_overhead_us must be a number"):
        Hardware.from_dict({**yaml_of(both), "runs": [{"cpu.moe_overhead_us": "x"}]})


def yaml_of(hw):
    from dataclasses import asdict

    d = asdict(hw)
    d.pop("samples")
    d.pop("runs")
    return d


def test_validate_summary_interval_and_plot(tmp_path):
    from sim.validate import summarize

    hw = _with_samples()
    r = validate(ROOT / "traces" / "serve-demo-avx2-L4-E32-b2b.json", hw, interval=20)
    for m in r["metrics"].values():
        lo, hi = m["interval"]
        assert lo <= hi and m["inside"] == (lo <= m["measured"] <= hi)
    one = validate(TRACE, hw)
    table = summarize([r, one])
    assert table["ttft_s"]["n"] == 2 and table["e2e_s"]["n"] == 1
    assert table["tpot_s"]["mape"] == pytest.approx(
        (abs(r["metrics"]["tpot_s"]["error"]) + abs(one["metrics"]["tpot_s"]["error"])) / 2
    )
    prof = tmp_path / "p.yaml"
    hw.save(prof)
    png = tmp_path / "v.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.cli",
            "validate",
            str(TRACE),
            "--hardware",
            str(prof),
            "--interval",
            "10",
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "MAPE" in out and "inside the interval" in out and "[90%:" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_merge_keeps_runs_and_validate_allows_for_their_drift(tmp_path):
    """`calibrate --merge` keeps each calibration's medians; `validate --drift` widens the
    intervals by the drift between them; a negative --gap is refused."""
    quick, sluggish = _with_samples(), _with_samples()
    sluggish.cpu.dram_gbps_per_socket, sluggish.cpu.fp8_gemv_efficiency = 25.0, 0.6
    quick.save(tmp_path / "q.yaml")
    sluggish.save(tmp_path / "s.yaml")

    def cli(*argv):
        return subprocess.run(
            [sys.executable, "-m", "sim.cli", *argv], capture_output=True, text=True, timeout=120
        )

    assert (
        cli(
            "calibrate",
            "--merge",
            str(tmp_path / "q.yaml"),
            str(tmp_path / "s.yaml"),
            "--out",
            str(tmp_path / "m.yaml"),
        ).returncode
        == 0
    )
    merged = Hardware.load(tmp_path / "m.yaml")
    assert [r["cpu.dram_gbps_per_socket"] for r in merged.runs] == [
        quick.cpu.dram_gbps_per_socket,
        25.0,
    ]

    def band(*extra):
        out = cli(
            "validate",
            str(TRACE),
            "--hardware",
            str(tmp_path / "q.yaml"),
            "--interval",
            "10",
            "--json",
            *extra,
        )
        assert out.returncode == 0, out.stderr
        lo, hi = json.loads(out.stdout)["traces"][0]["metrics"]["tpot_s"]["interval"]
        return lo, hi

    plain, drifted = band(), band("--drift", str(tmp_path / "m.yaml"))
    assert drifted[0] < plain[0] and drifted[1] > plain[1]
    bad = cli("calibrate", "--runs", "2", "--gap", "-1")
    assert bad.returncode != 0 and "--gap" in bad.stderr


def test_profile_with_runs_and_auto_on_a_cpu_box():
    """sim/profiles/zen3-2vcpu-3runs.yaml pools three calibrations of this machine and keeps
    each one's medians: its intervals allow for the drift between them. auto on a box with no
    GPU is the CPU path (there is nothing to stream to), as in the engine."""
    from sim.interval import bootstrap

    hw = Hardware.load("zen3-2vcpu-3runs")
    assert len(hw.runs) == 3 and not hw.gpus
    cfg = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    p = predict(cfg, hw, 256, 8, prefill="auto")
    assert p.prefill == "cpu" and p == predict(cfg, hw, 256, 8, prefill="cpu")
    with pytest.raises(ValueError, match="SLP needs a GPU"):
        predict(cfg, hw, 256, 8, prefill="slp")

    def fn(h):
        return {"tpot_s": predict(cfg, h, 16, 4).tpot_s}

    lo, hi = bootstrap(fn, hw, 20)["tpot_s"]
    p_lo, p_hi = bootstrap(fn, hw, 20, drift=[])["tpot_s"]
    assert lo < p_lo <= p_hi < hi


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


def test_dual_batch_overlap_in_serve():
    """With a GPU, two decoding requests run as two micro-batches whose GPU attention and CPU
    experts overlap layer by layer: each layer two slots, each the longer of one micro-batch's
    attention and the other's experts; the dense layers and the logits, GPU only, overlap
    nothing. Off, one batch of two. On a CPU-only profile auto leaves it off, as the engine
    does."""
    import simpy

    from sim.predict import Machine
    from sim.serve import Costs, Part, simulate

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    reqs = [(0.0, 32, 60), (0.0, 32, 60)]
    on, _ = simulate(cfg, hw, reqs, dual_batch="on")
    off, _ = simulate(cfg, hw, reqs, dual_batch="off")
    c = Costs(cfg, hw, Machine(simpy.Environment(), hw))
    gpu = sum(
        p.seconds
        for p in c(1, "decode")
        if p.demand and not any(lk.name.startswith("cores") for lk in p.demand)
    )
    g, e = c._sides(1)
    # the paper's per-layer figures (about 350 us attention, 450 us experts) come out of the
    # spec sheet; the 3 dense layers have no experts, and the logits ride on layer 0
    assert g[3] == pytest.approx(351e-6, rel=0.02) and e[3] == pytest.approx(449e-6, rel=0.02)
    assert e[:3] == [0.0, 0.0, 0.0] and sum(g) + sum(e) == pytest.approx(c.seconds(1, "decode"))
    ideal = sum(max(g[i], e[i - 1]) + max(g[i], e[i]) for i in range(len(g)))
    # the pipeline pays for the GPU-only layers: more than max(both GPU halves, both CPU
    # halves), less than the two forwards back to back
    assert 2 * max(gpu, c.seconds(1, "decode") - gpu) < ideal < 2 * c.seconds(1, "decode")
    # request 0 started first, so its last steps are the ones with both decoding
    # plus both micro-batches' reads of their caches (under 92 tokens each), not overlapped
    assert gpu > 0 and ideal < on[0].itl_s[-1] < ideal + sum(p.seconds for p in c.context((92, 92)))
    assert c.overlapped(1, 1) == [Part(ideal, c.overlapped(1, 1)[0].demand)]
    # off: one batch of two, plus its attention over the two caches (under 2 x 92 tokens)
    assert (
        c.seconds(2, "decode")
        < off[0].itl_s[-1]
        < sum(p.seconds for p in c(2, "decode") + c.context((92, 92)))
    )
    assert on[0].itl_s[-1] < off[0].itl_s[-1]
    demo = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    _, _, tr = simulate(demo, Hardware.load("zen3-2vcpu-calibrated"), reqs[:1] * 2, trace=True)
    steps = [e for e in tr.to_json()["traceEvents"] if e.get("name") == "decode"]
    assert steps and all(e["args"]["micro_batches"] == 1 for e in steps)
    with pytest.raises(ValueError, match="dual_batch"):
        simulate(cfg, hw, reqs, dual_batch="maybe")


def test_simulated_trace_per_layer_lanes():
    """--trace-layers: every forward's attention and expert spans on the engine's lanes
    (device / attention, cpu / experts), inside the forward's own span, in layer order."""
    from sim.serve import simulate

    cfg = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    hw = Hardware.load("zen3-2vcpu-calibrated")
    _, _, tr = simulate(cfg, hw, [(0.0, 24, 4), (0.3, 16, 3)], trace=True, trace_layers=True)
    doc = tr.to_json()
    lanes = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert {"attention", "experts", "prefill worker", "decode worker"} <= lanes
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    forwards = [e for e in spans if e["name"] in ("prefill", "decode")]
    layers = [e for e in spans if e["name"].startswith(("attention L", "experts L"))]
    assert len(layers) == 2 * cfg.num_hidden_layers * len(forwards)
    prefill = next(e for e in forwards if e["name"] == "prefill")
    inside = [e for e in layers if e["args"]["tokens"] == 24]
    assert [e["name"] for e in inside[:2]] == ["attention L0", "experts L0"]
    assert all(
        prefill["ts"] - 1e-3 <= e["ts"]
        and e["ts"] + e["dur"] <= prefill["ts"] + prefill["dur"] + 1e-3
        for e in inside
    )


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


def test_validation_series_on_this_machine():
    """The served traces in traces/validation (2-vCPU Zen 3; 1 and 2 kernel threads; 4x32 and
    2x64 experts; 0.1-1 req/s; prompts of 16-768 tokens), each replayed on its own
    calibrations taken just before and just after it, pooled. The committed figures
    (docs/simulator.md): over all 22, MAPE TPOT 14.6%, TTFT 16.4%, biased +7.2% at most; over
    val12-14 (the engine with absorbed MLA, calibrated with the attention's contexts taking
    turns) TPOT 7.2%, TTFT 11.9%. This guards the model against drifting from them."""
    from sim.interval import pool
    from sim.validate import summarize

    results = {}
    for trace in sorted((ROOT / "traces" / "validation").glob("*.json")):
        base = str(trace.with_suffix(""))
        hw = pool([Hardware.load(f"{base}-before.yaml"), Hardware.load(f"{base}-after.yaml")])
        results[trace.name] = r = validate(trace, hw)
        assert "warning" not in r
        # val10's calibrations disagree 30-fold on the attention's fixed cost (noise hit the
        # per-context timing that val12 onwards replaced): its TPOT is 59% high; val21's run
        # streamed its experts at 25.9 GB/s where its calibrations read 21-28: 34% high
        bound = {"val10": 0.6, "val21": 0.4}.get(trace.name.split("-")[0], 0.30)
        assert abs(r["metrics"]["tpot_s"]["error"]) < bound
    table = summarize(list(results.values()))
    assert len(results) == 22
    assert table["tpot_s"]["mape"] < 0.16 and table["ttft_s"]["mape"] < 0.18
    assert abs(table["tpot_s"]["bias"]) < 0.08 and abs(table["ttft_s"]["bias"]) < 0.06
    latest = summarize(
        [r for name, r in results.items() if name[:5] in ("val12", "val13", "val14")]
    )
    assert latest["tpot_s"]["mape"] < 0.09 and latest["ttft_s"]["mape"] < 0.14


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
