"""Routing recorded by the engine (refmoe.routing) and replayed by the simulator."""

import json

import pytest
import torch
from sim_common import V3

from refmoe import models, routing
from refmoe.config import ModelConfig
from sim.hardware import Hardware
from sim.predict import load_routing, predict

transformers = pytest.importorskip("transformers")


def test_the_router_counts_what_it_routes(tmp_path):
    """Every token of every forward, prompt and decode, is counted once per MoE layer, K
    experts each; reset starts afresh."""
    from test_deepseek_v3 import BASE, PROMPT, random_model

    random_model({}).save_pretrained(tmp_path)
    cfg, mine = models.load(tmp_path)
    cache = mine.new_cache()
    mine.forward(torch.tensor(PROMPT), cache)
    mine.forward(torch.tensor([5]), cache)
    rec = routing.record(mine)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert sorted(map(int, rec["layers"])) == moe_layers and moe_layers
    for layer in rec["layers"].values():
        assert layer["tokens"] == len(PROMPT) + 1
        assert sum(layer["experts"]) == (len(PROMPT) + 1) * BASE["num_experts_per_tok"]
    p = routing.popularity(json.loads(json.dumps(rec)))
    assert all(abs(v.sum() - cfg.num_experts_per_tok) < 1e-9 for v in p.values())
    routing.reset(mine)
    assert routing.record(mine)["layers"] == {}


def _record(path, counts: list[int], tokens: int, layers=(3, 4), trace: bool = False):
    rec = {
        "n_routed_experts": len(counts),
        "num_experts_per_tok": 8,
        "layers": {str(i): {"tokens": tokens, "experts": counts} for i in layers},
    }
    path.write_text(json.dumps({"traceEvents": [], "metadata": {"routing": rec}} if trace else rec))
    return str(path)


def test_replayed_routing_changes_what_decode_reads(tmp_path):
    """Uniform recorded routing predicts what uniform routing does; routing that sends every
    token to the same 8 experts makes a batched decode step read 8 experts, not ~64."""
    cfg, hw = ModelConfig.from_dict(V3), Hardware.load("paper-2x9355-2x5090")
    uniform = load_routing(_record(tmp_path / "u.json", [8] * 256, 256, trace=True), cfg)
    hot = load_routing(_record(tmp_path / "h.json", [100] * 8 + [0] * 248, 100), cfg)
    plain = predict(cfg, hw, 64, 3)
    assert predict(cfg, hw, 64, 3, routing=uniform).tpot_s == pytest.approx(plain.tpot_s, rel=1e-9)
    import simpy

    from sim.predict import Machine
    from sim.serve import Costs, simulate

    def step(r):
        return Costs(cfg, hw, Machine(simpy.Environment(), hw), routing=r).seconds(8, "decode")

    assert step(uniform) == pytest.approx(step(None), rel=1e-9)
    assert step(hot) < 0.75 * step(uniform)
    flat, _ = simulate(cfg, hw, [(0.0, 16, 4)], routing=uniform)
    skewed, _ = simulate(cfg, hw, [(0.0, 16, 4)], routing=hot)
    assert skewed[0].ttft_s < 0.6 * flat[0].ttft_s  # 16 tokens on 8 experts, not ~100


def test_bad_routing_records_are_refused(tmp_path):
    cfg = ModelConfig.from_dict(V3)
    with pytest.raises(ValueError, match=r"few\.json: routing recorded over 64 experts"):
        load_routing(_record(tmp_path / "few.json", [8] * 64, 64), cfg)
    with pytest.raises(ValueError, match=r"sum\.json: layer 3: expected 256 counts"):
        load_routing(_record(tmp_path / "sum.json", [1] * 256, 256), cfg)
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": [], "metadata": {}}))
    with pytest.raises(ValueError, match=r"t\.json: this trace carries no routing"):
        load_routing(str(tmp_path / "t.json"), cfg)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match=r"x\.json: cannot read"):
        load_routing(str(tmp_path / "x.json"), cfg)
