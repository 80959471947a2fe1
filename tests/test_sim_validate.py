"""Calibration, prediction intervals and validation against measured traces."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
from sim_common import ROOT, TRACE

from refmoe.config import ModelConfig
from sim.hardware import Hardware
from sim.predict import predict
from sim.validate import validate


def _with_samples():
    hw = Hardware.load("zen3-2vcpu-calibrated")
    hw.samples = {
        "cpu.dram_gbps_per_socket": [30.0, 33.0, 37.0, 40.0, 45.0],
        "cpu.fp8_gemv_efficiency": [0.78, 0.8, 0.83, 0.86, 0.9],
        "cpu.gemm_gbps_by_m.4": [4.0, 4.5, 5.0, 5.5, 6.0],
    }
    return hw


def test_validate_on_the_measured_trace():
    r = validate(TRACE, Hardware.load(ROOT / "sim" / "profiles" / "zen3-2vcpu-calibrated.yaml"))
    tpot = r["metrics"]["tpot_s"]
    assert tpot["measured"] == pytest.approx(0.0827, rel=0.01)
    assert abs(tpot["error"]) < 0.05  # the target for TPOT
    assert abs(r["metrics"]["ttft_s"]["error"]) < 0.5  # prefill is modelled crudely (docs)


def test_serving_validation_on_the_measured_serve_trace():
    r = validate(
        ROOT / "traces" / "serve-demo-avx2-L4-E32.json", Hardware.load("zen3-2vcpu-calibrated")
    )
    assert r["requests"] == 12
    assert set(r["metrics"]) == {"ttft_s", "tpot_s", "e2e_s", "output_tok_s"}
    doc = json.loads((ROOT / "traces" / "serve-demo-avx2-L4-E32.json").read_text())
    records = doc["metadata"]["requests"]
    for m in r["metrics"].values():  # error is (predicted - measured) / measured, by definition
        assert m["error"] == pytest.approx((m["predicted"] - m["measured"]) / m["measured"])
    # the measured side is the engine's own request records: mean first-token time
    ttft = [q["first_token_time"] - q["arrival"] for q in records]
    assert r["metrics"]["ttft_s"]["measured"] == pytest.approx(sum(ttft) / len(ttft))


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
    GPU picks the CPU path for a short prompt, and SLP there streams to the CPU itself, as in
    the engine."""
    from sim.interval import bootstrap

    hw = Hardware.load("zen3-2vcpu-3runs")
    assert len(hw.runs) == 3 and not hw.gpus
    cfg = ModelConfig(**json.loads(TRACE.read_text())["metadata"]["model"])
    p = predict(cfg, hw, 256, 8, prefill="auto")
    assert p.prefill == "cpu" and p == predict(cfg, hw, 256, 8, prefill="cpu")
    assert predict(cfg, hw, 256, 8, prefill="slp").prefill == "slp"

    def fn(h):
        return {"tpot_s": predict(cfg, h, 16, 4).tpot_s}

    lo, hi = bootstrap(fn, hw, 20)["tpot_s"]
    p_lo, p_hi = bootstrap(fn, hw, 20, drift=[])["tpot_s"]
    assert lo < p_lo <= p_hi < hi


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


def test_agent_validation_on_the_measured_agent_run():
    """Two agents, three turns, 4K-token contexts, measured on this VM with the demo model
    (traces/agents/demo-*-run3: the engine with the CPU flash attention, 2026-12-05), replayed
    from the trace's workload shape through the simulator's prefix cache and chunked prefill
    on the profile calibrated beside it. run1 and run2 (2026-12-04) measured the engine
    before the CPU flash attention, which the simulator no longer models."""
    r = validate(
        ROOT / "traces" / "agents" / "demo-L1-E32-2x3-4096-run3.json",
        Hardware.load("vm-2vcpu-avx512-2026-12-05-flash"),
    )
    m = r["metrics"]
    assert set(m) == {"ttft_first_turn_s", "ttft_later_turns_s", "tpot_s", "prefix_hit_rate"}
    assert m["prefix_hit_rate"]["measured"] == pytest.approx(0.646, abs=0.01)
    assert m["prefix_hit_rate"]["error"] == pytest.approx(0.0, abs=1e-9)  # the same blocks
    # -3% / -12% / -11% on 2026-12-05; bounds with the spread of the earlier runs
    assert abs(m["ttft_first_turn_s"]["error"]) < 0.2
    assert abs(m["ttft_later_turns_s"]["error"]) < 0.3
    assert abs(m["tpot_s"]["error"]) < 0.2


def test_agent_validation_on_a_linear_attention_model():
    """The Qwen3-Next demo's agent run (traces/agents/qwen3-next-*-r2), recorded with prefill
    auto: the engine ran both 4K-token first turns by SLP on the CPU (its "device" without a
    GPU, bf16 lane) on the prefill worker, one conversation's 201-token later turns by SLP
    (the worker free) and the other's in chunks on the decode steps (the worker busy with
    the other's first turn for 22 s, scheduler.worker_wait), and the replay chooses the same
    (sim.serve.policy_for streams to the CPU as the engine does, the scheduler is shared).
    The prefix cache keeps the engine's state snapshots, so it restores the same tokens
    every turn (the hit rate exactly). The first turns are 30% low: the SLP expert lane at
    this model's small experts (docs/simulator.md)."""
    r = validate(
        ROOT / "traces" / "agents" / "qwen3-next-L4-E32-2x3-4096-r2.json",
        Hardware.load("vm-2vcpu-avx512-2026-12-05-flash"),
    )
    m = r["metrics"]
    assert m["prefix_hit_rate"]["measured"] == pytest.approx(0.654, abs=0.01)
    assert m["prefix_hit_rate"]["error"] == pytest.approx(0.0, abs=1e-9)
    assert abs(m["ttft_first_turn_s"]["error"]) < 0.4  # -30%
    assert abs(m["tpot_s"]["error"]) < 0.15  # -4%
    assert abs(m["ttft_later_turns_s"]["error"]) < 0.2  # -4%
