"""validate --live (calibrations and held-out segments in turn), the lanes side by side, and
the calibration fields they brought: the fixed attention cost from a small block, the context
curve at two head counts, the decode MoE call's efficiency per format."""

import json

import pytest
from sim_common import ROOT

from refmoe import demo
from refmoe.config import ModelConfig
from sim import live
from sim.cli import main
from sim.hardware import Hardware
from sim.lanes import OUTSIDE, breakdown, compare, side_by_side
from sim.machine import Machine


def test_the_held_out_set_differs_from_the_demo_in_every_dimension():
    cfgs = [
        ModelConfig.from_dict(demo.demo_config(c.layers, c.experts, 8192, c.fmt, shape=c.shape))
        for c in live.CASES
    ]
    v3 = ModelConfig.from_dict(demo.demo_config(1, 16))
    assert len({c.hidden_size for c in cfgs} - {v3.hidden_size}) >= 3
    assert len({c.num_experts_per_tok for c in cfgs} - {8}) >= 2
    assert len({c.n_routed_experts for c in cfgs}) >= 3
    assert {c.fmt for c in live.CASES} >= {"fp8", "mxfp4", "nvfp4", "int4g"}
    assert {c.threads for c in live.CASES} == {None, 1}
    assert max(c.prompt for c in live.CASES) >= 1024 and min(c.prompt for c in live.CASES) <= 256
    # every case differs from the demo's run in something beyond the expert count
    for case, cfg in zip(live.CASES, cfgs):
        changed = (
            (cfg.hidden_size != v3.hidden_size)
            + (cfg.num_experts_per_tok != 8)
            + (case.fmt != "fp8")
            + (case.threads is not None)
            + (case.prompt > 1000)
        )
        assert changed >= 1, case.name


def test_demo_shape_overrides_are_checked():
    with pytest.raises(ValueError, match="unknown layer fields hiden_size"):
        demo.demo_config(1, 16, shape={"hiden_size": 1024})
    with pytest.raises(ValueError, match="shape overrides are for the DeepSeek families"):
        demo.demo_config(1, 16, family="gpt_oss", shape={"hidden_size": 1024})
    assert demo.demo_config(1, 16, shape={"hidden_size": 1024})["hidden_size"] == 1024


@pytest.fixture(scope="module")
def quick_live(tmp_path_factory):
    """Two quick segments through the command itself (tiny held-out models, quick
    calibrations): the mechanism, not the accuracy (the figures are docs/simulator.md's)."""
    out = tmp_path_factory.mktemp("live")
    models = tmp_path_factory.mktemp("models")
    rc = main(
        [
            "validate",
            "--live",
            "--quick",
            "--segments",
            "2",
            "--reps",
            "1",
            "--interval",
            "4",
            "--out",
            str(out),
            "--models",
            str(models),
        ]
    )
    assert rc == 0
    return out, json.loads((out / "live.json").read_text())


def test_live_predicts_each_segment_from_the_calibration_before_it(quick_live):
    out, results = quick_live
    segs = results["segments"]
    assert [s["segment"] for s in segs] == [f"{i:02d}-{c.name}" for i, c in enumerate(live.QUICK)]
    for s, case in zip(segs, live.QUICK):
        d = out / s["segment"]
        when = json.loads((d / "segment.json").read_text())
        assert when["calibrated_at"] < when["ran_at"]  # the calibration came just before
        hw = Hardware.load(d / "calibration.yaml")
        assert s["hardware"] == hw.name == f"calibration before {case.name}"
        doc = json.loads((d / "trace.json").read_text())
        assert doc["metadata"]["engine"]["case"] == case.name
        assert doc["metadata"]["engine"]["threads"] == (
            case.threads or doc["metadata"]["engine"]["threads"]
        )
        assert doc["metadata"]["model"]["hidden_size"] == case.shape["hidden_size"]
        req = doc["metadata"]["requests"][0]
        assert (req["prompt_tokens"], req["output_tokens"]) == (case.prompt, case.output)
        for metric in ("ttft_s", "tpot_s"):
            m = s["metrics"][metric]
            assert m["predicted"] > 0 and m["measured"] > 0
            assert m["error"] == pytest.approx((m["predicted"] - m["measured"]) / m["measured"])
            lo, hi = m["interval"]
            assert 0 < lo <= hi
            assert m["inside"] == (lo <= m["measured"] <= hi)
        # the calibration measured the fixed attention cost on the small block
        assert hw.cpu.layer_overhead_us > 1.0
        assert hw.cpu.attention_us_by_context_few_heads
        assert "fp8" in hw.cpu.moe_decode_efficiency_by_format
    summary = results["summary"]
    for metric in ("ttft_s", "tpot_s"):
        errs = sorted(abs(s["metrics"][metric]["error"]) for s in segs)
        assert summary[metric]["n"] == 2
        assert summary[metric]["median_abs_error"] == pytest.approx(sum(errs) / 2)
        assert summary[metric]["inside_interval"] == sum(
            s["metrics"][metric]["inside"] for s in segs
        )
    assert "median |error|" in live.format_results(results)


def test_lanes_side_by_side_on_a_live_segment(quick_live, tmp_path):
    out, results = quick_live
    d = out / results["segments"][0]["segment"]
    trace = json.loads((d / "trace.json").read_text())
    rows, merged = compare(trace, Hardware.load(d / "calibration.yaml"))
    lanes = {(r["phase"], r["lane"]) for r in rows}
    assert {("prefill", "attention"), ("prefill", "experts"), ("decode", "experts")} <= lanes
    assert ("decode", OUTSIDE) in lanes
    names = {e["args"]["name"] for e in merged["traceEvents"] if e.get("name") == "process_name"}
    assert {
        "measured: scheduler",
        "simulated: scheduler",
        "measured: cpu",
        "simulated: cpu",
    } <= names
    # the measured column is the trace's own spans, summed
    want = (
        sum(
            e["dur"]
            for e in trace["traceEvents"]
            if e.get("ph") == "X" and e["name"].startswith("experts L")
        )
        / 1e3
    )
    got = sum(r["measured_ms"] for r in rows if r["lane"] == "experts")
    assert got == pytest.approx(want)
    rc = main(
        [
            "validate",
            str(d / "trace.json"),
            "--hardware",
            str(d / "calibration.yaml"),
            "--lanes",
            str(tmp_path / "lanes.json"),
        ]
    )
    assert rc == 0 and json.loads((tmp_path / "lanes.json").read_text())["traceEvents"]


def _span(pid, tid, name, ts, dur, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def test_breakdown_charges_each_layer_span_to_the_forward_holding_it():
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "scheduler"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "steps"}},
        {"ph": "M", "name": "process_name", "pid": 2, "tid": 0, "args": {"name": "cpu"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 2, "args": {"name": "experts"}},
    ]
    events = meta + [
        _span(1, 1, "prefill", 0, 1000),
        _span(2, 2, "experts L0", 100, 300),
        _span(2, 2, "experts L1", 500, 400),
        _span(1, 1, "decode", 2000, 100),
        _span(2, 2, "experts L0", 2010, 40),
        _span(2, 2, "experts L1", 2050, 40),
        # a simulated step carrying a whole prompt's chunk and no decode is prefill
        _span(1, 1, "decode", 3000, 50, requests=1, prefill_chunk_tokens=8),
        _span(2, 2, "experts L0", 3000, 50),
    ]
    got = breakdown({"traceEvents": events})
    assert got[("prefill", "experts")] == pytest.approx([300e-6, 400e-6, 50e-6])
    assert got[("decode", "experts")] == pytest.approx([40e-6, 40e-6])
    assert got[("prefill", OUTSIDE)] == pytest.approx([300e-6, 0.0])
    assert got[("decode", OUTSIDE)] == pytest.approx([20e-6])
    merged = side_by_side(
        {"traceEvents": events, "metadata": {}}, {"traceEvents": events, "metadata": {}}
    )
    pids = {e["pid"] for e in merged["traceEvents"]}
    assert pids == {1, 2, 1001, 1002}


def test_context_curve_lies_between_the_two_head_counts():
    hw = Hardware.load(ROOT / "sim" / "profiles" / "zen3-2vcpu-calibrated.yaml")
    c = hw.cpu
    c.attention_us_by_context = {16: 0.0, 1040: 2048.0}
    assert c.attention_us(528, heads=64) == pytest.approx(1024.0)  # one curve: as timed
    c.attention_us_by_context_few_heads = {16: 0.0, 1040: 248.0}
    c.attention_heads, c.attention_few_heads = 128, 8
    assert c.attention_us(1040, heads=128) == pytest.approx(2048.0)
    assert c.attention_us(1040, heads=8) == pytest.approx(248.0)
    assert c.attention_us(1040, heads=68) == pytest.approx(248.0 + 0.5 * 1800.0)
    assert c.attention_us(1040) == pytest.approx(2048.0)


def test_bad_new_profile_fields_are_named(tmp_path):
    import yaml

    base = yaml.safe_load((ROOT / "sim" / "profiles" / "zen3-2vcpu-calibrated.yaml").read_text())
    for field, value, match in (
        ("moe_decode_efficiency_by_format", {"fp16": 0.5}, "moe_decode_efficiency_by_format"),
        ("moe_decode_efficiency_by_format", {"fp8": 1.5}, "moe_decode_efficiency_by_format"),
        ("attention_us_by_context_few_heads", {"x": 1.0}, "attention_us_by_context_few_heads"),
        ("attention_few_heads", 200, "attention_few_heads"),
    ):
        doc = json.loads(json.dumps(base))
        doc["cpu"][field] = value
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(doc))
        with pytest.raises(ValueError, match=match):
            Hardware.load(p)


def test_decode_moe_rate_and_four_bit_gemm_per_weight():
    import simpy

    hw = Hardware.load(ROOT / "sim" / "profiles" / "zen3-2vcpu-calibrated.yaml")
    m = Machine(simpy.Environment(), hw)
    before = m.rate_gbps(1, moe=True, fmt="int4g")
    assert before == pytest.approx(hw.cpu.stream_gbps("int4g"))  # uncalibrated: the GEMV's
    hw.cpu.moe_decode_efficiency_by_format = {"fp8": 0.6, "int4g": 0.8}
    m = Machine(simpy.Environment(), hw)
    read = (
        hw.cpu.read_gbps()
        if not hw.cpu.kernel_read_gbps
        else min(hw.cpu.kernel_read_gbps, hw.cpu.read_gbps())
    )
    assert m.rate_gbps(1, moe=True, fmt="int4g") == pytest.approx(read * 0.8)
    assert m.rate_gbps(1, moe=True) == pytest.approx(read * 0.6)
    assert m.rate_gbps(1, fmt="fp8") == pytest.approx(hw.cpu.fp8_stream_gbps())  # not a MoE
    # at 64 tokens per weight the GEMM is compute-bound: a 4-bit expert (0.53 bytes per
    # weight) takes as long per weight as FP8, so its stored-byte rate is 0.53 times as high
    fp8 = m.rate_gbps(64, moe=True)
    four = m.rate_gbps(64, moe=True, fmt="int4g", bytes_per_weight=0.53)
    assert four == pytest.approx(fp8 * 0.53)
