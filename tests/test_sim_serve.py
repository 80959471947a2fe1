"""Many requests through the engine's own policy (sim/serve.py): the serving block, decode
beside a prefill, contention, dual-batch overlap, traces, sweeps, the paper's rows."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
from sim_common import TRACE, V3

from refmoe.config import ModelConfig
from sim.hardware import Hardware
from sim.predict import predict


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


@pytest.mark.parametrize("chunked", [False, True])
def test_simulated_trace_has_the_engine_lanes(chunked):
    """Two CPU prompts, the second arriving while the first decodes: each run whole by the
    prefill worker, or (chunked prefill) in chunks on the decode worker, the second's riding
    along the first's decode steps, as the engine's spans show it."""
    from sim.serve import simulate

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    outcomes, _, tr = simulate(
        cfg, hw, [(0.0, 64, 5), (0.5, 32, 3)], trace=True, prefill="cpu", chunked_prefill=chunked
    )
    doc = tr.to_json()
    lanes = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert lanes == ({"decode worker"} if chunked else {"prefill worker", "decode worker"})
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    decodes = [e for e in spans if e["name"] == "decode"]
    with_chunk = [e for e in decodes if "prefill_chunk_tokens" in e["args"]]
    assert sum(e["name"] == "prefill" for e in spans) == (0 if chunked else 2)
    assert sum(e["args"]["prefill_chunk_tokens"] for e in with_chunk) == (96 if chunked else 0)
    # every decode step gives each of its decoding requests a token (the chunk gives none)
    assert sum(e["args"]["requests"] for e in decodes) - len(with_chunk) == 4 + 2
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
    # both prompts prefilled whole (no chunked prefill), so both decode from the start
    on, _ = simulate(cfg, hw, reqs, dual_batch="on", chunked_prefill=False)
    off, _ = simulate(cfg, hw, reqs, dual_batch="off", chunked_prefill=False)
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
    # prompts whole on the prefill worker (a chunked one's layers ride the decode steps')
    _, _, tr = simulate(
        cfg,
        hw,
        [(0.0, 24, 4), (0.3, 16, 3)],
        trace=True,
        trace_layers=True,
        chunked_prefill=False,
    )
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


def test_trace_carries_link_load_tracks_with_utilization():
    from sim.serve import simulate

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    outcomes, _, tr, timeline = simulate(
        cfg, hw, [(0.0, 64, 3), (0.2, 32, 3)], trace=True, utilization=True
    )
    counters = [e for e in tr.to_json()["traceEvents"] if e["ph"] == "C"]
    links = {e["name"] for e in counters if "load" in e["args"]}
    assert {"dram0", "dram1", "pcie0.h2d", "gpu0"} <= links
    assert all(0.0 <= e["args"]["load"] <= 1.0 + 1e-9 for e in counters if "load" in e["args"])
    # one point per link per rate change of the timeline
    assert len([e for e in counters if e["name"] == "dram0"]) == len(timeline)


@pytest.mark.parametrize("profile", ["paper-2x9355-2x5090", "zen3-2vcpu-calibrated"])
def test_forward_costs_from_one_layer_of_each_kind(profile):
    """A cost run takes every layer whose costs and routing it has seen from the first such
    layer (_Costing.layer), and an SLP prefill's pipeline in closed form (_Costing.pipeline):
    the parts, their demands and every layer's span come out as running each layer's events,
    with uniform routing (DeepSeek-V3: 3 dense layers then 58 alike) and with a record whose
    layers differ."""
    import simpy

    from sim.predict import Machine, routing_bins
    from sim.serve import Costs

    cfg, hw = ModelConfig.from_dict(V3), Hardware.load(profile)
    skewed = routing_bins(256, 8, 1.2)
    record = {3: skewed, 4: routing_bins(256, 8), 5: skewed}  # layer 6 on: the cycle again
    paths = [(7, "decode", (0,)), (300, "cpu", (0,)), (1, "cpu", (0,)), (2000, "slp", (0,))]
    if hw.gpus:
        # SLP's pipeline in closed form (_Costing.pipeline) against its events: copies the
        # bound (short prompts), compute the bound, several chunks, two GPUs
        paths += [(3000, "slp", (0, 1)), (40000, "slp", (0,)), (900, "offload", (0,))]
        paths += [(50000, "slp", (0, 1)), (64, "slp", (1,))]
    for routing in (None, record):
        env = simpy.Environment()
        reused = Costs(cfg, hw, Machine(env, hw), routing=routing)
        every = Costs(cfg, hw, Machine(env, hw), routing=routing, reuse_layers=False)
        for tokens, path, gpus in paths:
            a, b = reused(tokens, path, gpus), every(tokens, path, gpus)
            assert len(a) == len(b) > 0
            for pa, pb in zip(a, b):
                assert pa.seconds == pytest.approx(pb.seconds, rel=1e-12)
                assert {lk.name: w for lk, w in pa.demand.items()} == pytest.approx(
                    {lk.name: w for lk, w in pb.demand.items()}, rel=1e-12
                )
            sa, sb = reused.layers[(path, tokens, gpus)], every.layers[(path, tokens, gpus)]
            assert [s[:3] for s in sa] == [s[:3] for s in sb]
            assert len({s[2] for s in sb if s[2].startswith("attention")}) == 61
            times = [t for s in sb for t in s[3:5]]
            assert [t for s in sa for t in s[3:5]] == pytest.approx(times, rel=1e-12)
        # the recorded layers cost differently: the reuse did not take one for another
        if routing is record:
            spans = {s[2]: s[4] - s[3] for s in every.layers[("cpu", 300, (0,))]}
            assert spans["experts L3"] != pytest.approx(spans["experts L4"], rel=1e-3)
