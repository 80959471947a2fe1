"""`refmoe-sim advise` (sim/advise.py): the parts catalog, the boxes it makes, the Pareto
front with its sensitivity ranges, local processes and a local Ray instance alike."""

import json

import pytest
import yaml

from sim import catalog, costs
from sim.advise import advise, boxes, load_parts, pareto, profile
from sim.hardware import from_spec_sheet
from sim.workloads import WORKLOADS

SMALL = {
    "cpus": [
        {"name": "A16", "cores": 16, "channels": 12, "mts": 4800, "fma_gflops_per_core": 100,
         "sockets": [1, 2], "interconnect_gbps": 300, "pcie_lanes": 32, "price": 1000},
        {"name": "B8", "cores": 8, "channels": 2, "mts": 4800, "fma_gflops_per_core": 80,
         "sockets": [1], "pcie_lanes": 16, "price": 300},
    ],
    "gpus": [
        {"name": "G24", "memory_gb": 24, "hbm_gbps": 1000, "bf16_tflops": 160, "pcie_gen": 4,
         "price": 1500},
    ],
    "memory": {"dimm_gb": [16, 32], "price_per_gb": 4.0},
    "platform": {"price_by_sockets": {1: 1000, 2: 2000}},
}  # fmt: skip


def _parts(tmp_path, doc=SMALL):
    path = tmp_path / "parts.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_parts(path)


def test_the_shipped_catalog_loads_and_every_box_holds_the_model():
    parts = load_parts()
    cfg = catalog.load("deepseek-v3")
    made, dropped = boxes(parts, cfg)
    assert len(made) > 300
    need = costs.model_bytes(cfg) * 1.15 / 1e9
    cpus = {c["name"]: c for c in parts["cpus"]}
    for b in made:
        c = cpus[b.cpu]
        assert b.ram_gb >= need and b.ram_gb == b.dimm_gb * c["channels"] * b.sockets
        smaller = [d for d in parts["memory"]["dimm_gb"] if d < b.dimm_gb]
        assert all(d * c["channels"] * b.sockets < need for d in smaller)  # the smallest DIMM
        assert b.gpus * 16 <= c["pcie_lanes"] * b.sockets
    assert 600 < costs.model_bytes(cfg) / 1e9 < 700  # DeepSeek-V3 in FP8


def test_boxes_drop_what_cannot_hold_the_model_or_costs_too_much(tmp_path):
    parts = _parts(tmp_path)
    cfg = catalog.load("gpt-oss-20b")  # 12.5 GB
    made, dropped = boxes(parts, cfg, max_gpus=4)
    names = {b.name for b in made}
    # B8: two channels of at most 32 GB hold it; A16's 32 lanes per socket: 2 GPUs, 4 on two
    assert "1x B8, 32 GB, 1x G24" in names and "1x B8, 32 GB, 2x G24" not in names
    assert "2x A16, 384 GB, 4x G24" in names and "1x A16, 192 GB, 3x G24" not in names
    big = catalog.load("qwen3-235b-a22b")  # 236 GB: B8's 64 GB cannot
    _, dropped = boxes(parts, big)
    assert any(w == "1x B8" and "the model needs" in why for w, why in dropped)
    cheap, over = boxes(parts, cfg, budget=3000)
    assert all(b.price <= 3000 for b in cheap) and over
    assert all("over the budget" in why for _, why in over)


def test_bad_catalogs_are_named(tmp_path):
    bad = {**SMALL, "gpus": [{"name": "X", "memory_gb": 24}]}
    with pytest.raises(ValueError, match=r"gpus\[0\] lacks hbm_gbps"):
        _parts(tmp_path, bad)
    bad = {**SMALL, "cpus": [{**SMALL["cpus"][0], "mts": -1}]}
    with pytest.raises(ValueError, match="bad mts"):
        _parts(tmp_path, bad)
    with pytest.raises(ValueError, match="price_by_sockets"):
        _parts(tmp_path, {**SMALL, "platform": {}})
    with pytest.raises(ValueError, match="no-such.yaml"):
        load_parts(tmp_path / "no-such.yaml")


def test_a_box_is_its_spec_sheet_profile_and_the_range_scales_every_rate(tmp_path):
    parts = _parts(tmp_path)
    made = boxes(parts, catalog.load("gpt-oss-20b"))[0]
    b = next(x for x in made if x.gpus == 2 and x.sockets == 2 and x.cpu == "A16")
    hw = profile(b, parts)
    ref = from_spec_sheet(b.name, 2, 16, 12, 4800, 100, 300, [("G24", 1000, 4, 160)] * 2)
    assert hw.cpu == ref.cpu and [g.pcie_gbps for g in hw.gpus] == [g.pcie_gbps for g in ref.gpus]
    assert all(g.memory_gb == 24 for g in hw.gpus)
    low = profile(b, parts, 0.85)
    assert low.cpu.read_gbps() == pytest.approx(0.85 * hw.cpu.read_gbps())
    assert low.gpus[0].pcie_gbps == pytest.approx(0.85 * hw.gpus[0].pcie_gbps)
    assert hw.cpu.dram_gbps_per_socket == ref.cpu.dram_gbps_per_socket  # not changed in place


def test_pareto_keeps_only_boxes_nothing_cheaper_beats():
    rows = [
        {"box": "a", "price": 1, "slo_attainment": 0.2, "goodput_req_s": 0.1},
        {"box": "b", "price": 2, "slo_attainment": 0.1, "goodput_req_s": 0.5},  # worse than a
        {"box": "c", "price": 3, "slo_attainment": 0.2, "goodput_req_s": 0.3},  # more goodput
        {"box": "d", "price": 4, "slo_attainment": 0.9, "goodput_req_s": 0.2},
        {"box": "e", "price": 5, "slo_attainment": 0.9, "goodput_req_s": 0.2},  # d, dearer
        {"box": "f", "price": 4, "slo_attainment": 0.95, "goodput_req_s": 0.2},
    ]
    assert [r["box"] for r in pareto(rows)] == ["a", "c", "f"]


def test_advise_front_with_ranges_on_processes_and_on_ray(tmp_path):
    parts = _parts(tmp_path)
    cfg = catalog.load("gpt-oss-20b")
    wl = WORKLOADS["chat"].scaled(num_prompts=4)
    res = advise(cfg, wl, parts, max_gpus=2, workers=1)
    assert res["evaluated"] == len(boxes(parts, cfg, 2)[0])
    front = res["front"]
    assert front and [r["price"] for r in front] == sorted(r["price"] for r in front)
    att = [r["slo_attainment"] for r in front]
    assert att == sorted(att)
    for r in front:
        assert r["slo_attainment_low"] <= r["slo_attainment"] + 1e-9
        assert r["slo_attainment_high"] >= r["slo_attainment"] - 1e-9
    on_ray = advise(cfg, wl, parts, max_gpus=2, workers=2, ray="local")
    assert [r["box"] for r in on_ray["rows"]] == [r["box"] for r in res["rows"]]
    for a, b in zip(on_ray["rows"], res["rows"]):
        assert a["slo_attainment"] == b["slo_attainment"]
        assert a["p90_ttft_s"] == pytest.approx(b["p90_ttft_s"], rel=1e-12)


def test_advise_cli(tmp_path, capsys):
    from sim.cli import main

    path = tmp_path / "parts.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    png = tmp_path / "front.png"
    argv = ["advise", "--model", "gpt-oss-20b", "--parts", str(path), "--workload", "chat"]
    argv += ["--num-prompts", "3", "--max-gpus", "1", "--workers", "1", "--budget", "5000"]
    assert main(argv + ["--plot", str(png), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert all(r["price"] <= 5000 for r in res["rows"]) and res["dropped"]
    assert png.stat().st_size > 10_000
    assert main(argv + ["--slo-ttft", "1"]) == 0
    assert "Pareto front" in capsys.readouterr().out
    assert main(argv[:3] + ["--parts", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    assert main(argv[:2] + ["kimi-k2", "--parts", str(path), "--workers", "1"]) == 2
    assert "no box in the catalog holds the model" in capsys.readouterr().err
