"""Agents in the simulator (sim/agents.py, sim/serve.py): the prefix cache as the simulator
keeps it, closed-loop conversations through the engine's scheduler (its prefix lookups and
chunked prefill), and the capacity question, on a profile of the paper's box."""

import dataclasses
import json
from pathlib import Path

import pytest
from sim_common import V3

from refmoe import costmodel
from refmoe.config import ModelConfig
from refmoe.serving_metrics import Turn, agent_summary, agent_workload
from sim import costs
from sim.agents import PrefixModel, capacity, host_bytes_per_token
from sim.hardware import Hardware
from sim.serve import Simulation

QWEN3_NEXT_TRACE = Path(__file__).parents[1] / "traces/agents/qwen3-next-L4-E32-2x3-4096.json"


def test_prefix_model_matches_stores_and_evicts_like_the_engine():
    pm = PrefixModel(capacity_bytes=200 * 10, bytes_per_token=10, block=32)
    assert pm.match(0, 100) == 0
    pm.store(0, 100)  # three full blocks: 96 tokens
    assert pm.held[0] == 96 and pm.match(0, 97) == 96 and pm.match(0, 96) == 64
    pm.store(0, 90)  # shorter than what it holds: nothing changes
    assert pm.held[0] == 96
    pm.store(1, 70)  # 64 more tokens: 160 held, within 200
    pm.match(0, 200)  # conversation 0 used last
    pm.store(2, 64)  # 224 > 200: the least recently used (conversation 1) goes
    assert set(pm.held) == {0, 2} and pm.evictions == 1
    assert pm.nbytes <= pm.capacity
    pm.store(3, 1000)  # more than the whole budget: not kept
    assert 3 not in pm.held
    # float32 latent and rope key, every layer: 140 KB per token, as the engine keeps it
    assert host_bytes_per_token(ModelConfig.from_dict(V3)) == 4 * 576 * 61


def test_prefix_model_keeps_snapshots_for_linear_attention():
    """A linear-attention model is cached as the engine caches it: snapshots at a prompt's
    marks and a turn's end, each costing the state's bytes; a lookup finds the last one
    before the prompt's last token."""
    from refmoe.prefix_cache import PrefixCache

    pm = PrefixModel(10_000, bytes_per_token=10, block=32, state_bytes=1000, snapshot_every=40)
    assert pm.every == 64
    pm.store(0, 100, cached=0)  # a prompt of 100: snapshots at 64 and 99, as the engine marks
    assert PrefixCache(1, 32, snapshot_every=40).marks(100, 0) == [64, 99]
    assert pm.snaps[0] == [64, 99] and pm.nbytes == 99 * 10 + 2 * 1000
    assert pm.match(0, 100) == 99 and pm.match(0, 99) == 64 and pm.match(0, 64) == 0
    pm.store(0, 107)  # the turn ends 8 tokens later
    assert pm.match(0, 300) == 107 and pm.snaps[0] == [64, 99, 107]
    pm.store(1, 300, cached=0)  # 5 snapshots and 299 tokens: 7,990 bytes; 0 (4,070) must go
    assert set(pm.held) == {1} and pm.evictions == 1 and pm.nbytes <= pm.capacity
    pm.store(2, 2000, cached=0)  # more than the whole budget: not kept, 1 stays
    assert set(pm.held) == {1} and 2 not in pm.snaps


def test_later_turns_of_a_linear_attention_model_restore_their_state():
    """Qwen3.5-35B-A3B's published config, two agents on the paper's box: later turns restore
    the snapshot at the previous turn's end (every token of it, not whole blocks)."""
    from sim.catalog import resolve

    cfg = ModelConfig.from_file(resolve("qwen3.5-35b-a3b"))
    convos = agent_workload(2, 3, 4096, (200, 400), (32, 64), (1.0, 2.0), seed=1)
    run = Simulation(cfg, Hardware.load("paper-2x9355-2x5090"), [], conversations=convos).run()
    for r in run.records:
        prev = [
            x.outcome
            for x in run.records
            if (x.conversation, x.turn) == (r.conversation, r.turn - 1)
        ]
        want = prev[0].prompt_tokens + prev[0].output_tokens - 1 if prev else 0
        assert r.cached_tokens == want


def _run(hw, convos, **kw):
    cfg = ModelConfig.from_dict(V3)
    run = Simulation(cfg, Hardware.load(hw), [], conversations=convos, **kw).run()
    return run, agent_summary(run.records, run.duration_s)


def test_later_turns_reuse_the_prefix():
    """Two agents, 4K-token contexts, on the paper's box: turn 1 streams (SLP); later turns
    find their history cached and prefill only the few hundred new tokens, on the path the
    cost model picks for that many (the CPU): far sooner than without the cache, where every
    turn is a whole SLP pass again."""
    convos = agent_workload(2, 3, 4096, (200, 400), (32, 64), (1.0, 2.0), seed=1)
    run, s = _run("paper-2x9355-2x5090", convos, prefill="auto")
    assert s["completed"] == 6 and s["failed"] == 0
    for r in run.records:
        if r.turn == 1:
            assert r.cached_tokens == 0
        else:  # the previous prompt and reply, in full 32-token blocks
            prev = next(
                x.outcome
                for x in run.records
                if x.conversation == r.conversation and x.turn == r.turn - 1
            )
            assert r.cached_tokens == (prev.prompt_tokens + prev.output_tokens - 1) // 32 * 32
    assert 0.6 < s["prefix_hit_rate"] < 1.0
    _, off = _run("paper-2x9355-2x5090", convos, prefill="auto", prefix_cache_gib=0)
    assert off["prefix_hit_rate"] == 0
    later = lambda x: (x["mean_ttft_ms_by_turn"][2] + x["mean_ttft_ms_by_turn"][3]) / 2  # noqa: E731
    assert later(s) < 0.5 * later(off)
    assert s["mean_ttft_ms_by_turn"][3] < 0.5 * s["mean_ttft_ms_by_turn"][1]


def test_chunked_prefill_protects_decode_on_a_cpu_box():
    """The calibrated profile of this 2-core VM and a one-layer demo-shaped model: with chunked
    prefill (auto: on, no GPU) the other agent's tokens slow by at most about the rule's 1.2
    while a turn prefills; run whole beside them they slow by far more."""
    cfg = dict(V3, num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=32)
    convos = agent_workload(2, 3, 1024, (200, 400), (32, 64), (1.0, 2.0), seed=1)
    hw = Hardware.load("zen3-2vcpu-calibrated")
    runs = {
        c: agent_summary(
            *(lambda r: (r.records, r.duration_s))(
                Simulation(
                    ModelConfig.from_dict(cfg), hw, [], conversations=convos, chunked_prefill=c
                ).run()
            )
        )
        for c in ("auto", "off")
    }
    assert runs["auto"]["itl_during_prefill_ratio"] < 1.3
    assert runs["off"]["itl_during_prefill_ratio"] > 1.6


def test_a_conversation_that_outgrows_the_context_ends_there():
    cfg = dict(V3, max_position_embeddings=600)
    convos = [[Turn(300, 50, 0.1), Turn(200, 50, 0.1), Turn(100, 10, 0.1), Turn(5, 5, 0.1)]]
    run = Simulation(
        ModelConfig.from_dict(cfg), Hardware.load("paper-2x9355-2x5090"), [], conversations=convos
    ).run()
    # 350 tokens, then 350 + 200 + 50 = 600 (just fits), then 700 + 10: refused, and no more
    assert [r.outcome.ok for r in run.records] == [True, True, False]
    assert "exceeds the context" in run.records[2].outcome.error


def test_capacity_is_the_most_agents_within_the_targets():
    cfg = ModelConfig.from_dict(V3)
    hw = Hardware.load("paper-2x9355-2x5090")
    kw = dict(turns=2, context=2048, output_tokens=(32, 64), think_s=(1.0, 2.0), prefill="auto")
    n, tried = capacity(cfg, hw, ttft_s=10.0, tok_s=15.0, most=8, **kw)
    assert n >= 1 and [v.conversations for v in tried] == sorted(v.conversations for v in tried)
    fits = {v.conversations: v.ok for v in tried}
    assert fits[n] and all(fits[k] for k in fits if k <= n)
    if n < 8:
        assert fits.get(n + 1) is False
    # a target nothing meets: none fit
    zero, _ = capacity(cfg, hw, ttft_s=1e-6, tok_s=15.0, most=4, **kw)
    assert zero == 0


def test_cli_agent_scenario(capsys):
    from sim.cli import main

    assert (
        main(
            [
                "serve",
                "--model",
                "deepseek-v3",
                "--hardware",
                "paper-2x9355-2x5090",
                "--scenario",
                "agent",
                "--conversations",
                "2",
                "--turns",
                "2",
                "--context",
                "1024",
                "--prefill",
                "auto",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Mean TTFT, turn 2 (ms):" in out and "Prefix cache hit rate (tokens):" in out


@pytest.mark.parametrize("chunked", ["on", "off"])
def test_cli_capacity(capsys, chunked):
    from sim.cli import main

    args = ["serve", "--model", "deepseek-v3", "--hardware", "paper-2x9355-2x5090"]
    args += ["--scenario", "agent", "--capacity", "4", "--turns", "2", "--context", "1024"]
    args += ["--prefill", "auto", "--chunked-prefill", chunked]
    assert main(args) == 0
    assert "concurrent agents within a p90 TTFT of 10 s" in capsys.readouterr().out


def test_prefix_attention_follows_the_engines_kernels():
    """A restored prefix or a chunk's past costs attention: a few new tokens as decode tokens
    after it (absorbed, the engine's threshold), more as a prompt's scores; nothing without a
    past; on a GPU the cache read or the FLOPs."""
    import simpy

    from refmoe.models.deepseek_v3 import ABSORB_MAX_TOKENS
    from sim.predict import Machine

    cfg = ModelConfig.from_dict(V3)
    # calibrated on this VM with decode attention by context (the older profile has none)
    cpu = Machine(simpy.Environment(), Hardware.load("vm-2vcpu-avx512-2026-12-04"))
    assert cpu.ABSORB_MAX_TOKENS == ABSORB_MAX_TOKENS
    assert cpu.prefix_attention(cfg, 100, 0) == (0.0, {})
    few = cpu.prefix_attention(cfg, 2, 4096)[0]
    assert few > 0 and few == pytest.approx(2 * cpu.prefix_attention(cfg, 1, 4096)[0])
    many = cpu.prefix_attention(cfg, 512, 4096)[0]
    assert many > cpu.prefix_attention(cfg, 512, 1024)[0] > 0
    gpu = Machine(simpy.Environment(), Hardware.load("paper-2x9355-2x5090"))
    assert 0 < gpu.prefix_attention(cfg, 512, 4096)[0] < many
    # exactly: the chunk scored over every key at the calibrated rate, less the causal
    # FLOPs from position 0 it is charged with anyway, plus (MLA) kv_b over the past latents
    per_key = 2 * 128 * (128 + 64 + 128)
    scores = per_key * (512 * (4096 + 512) - 512 * 513 / 2) / (cpu.hw.cpu.attention_gflops * 1e9)
    kv_b = costs.fp8_bytes(128 * (128 + 128), 512)
    expand = kv_b / (cpu.rate_gbps(4096 + 512) * 1e9) * 4096 / (4096 + 512)
    assert many == pytest.approx(scores + expand, rel=1e-12)
    # Qwen3-Next's demo (GQA, 1 layer in 4 of full attention): no kv_b; its linear layers'
    # recurrence costs the same after a past as from position 0
    meta = json.loads(QWEN3_NEXT_TRACE.read_text())["metadata"]["model"]
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    qwen = ModelConfig(**{k: v for k, v in meta.items() if k in names})
    per_key = 2 * qwen.num_attention_heads * costmodel.score_dims(qwen)
    keys = 201 * (4127 + 201) - 201 * 202 / 2
    got = cpu.prefix_attention(qwen, 201, 4127)[0]
    assert got == pytest.approx(0.25 * per_key * keys / (cpu.hw.cpu.attention_gflops * 1e9))


def test_the_simulator_does_not_load_torch():
    """Importing torch costs this machine 1.5-2.7 s a command: the simulator's modules must not
    (it crept back in through the prefix cache's block size; a 1,000-request run went from
    2.6 s to 4.2 s)."""
    import subprocess
    import sys

    from sim_common import ROOT

    code = "import sys, sim.cli, sim.serve, sim.agents, sim.validate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_a_box_without_a_gpu_reserves_a_shared_prefix_once(monkeypatch):
    """As the engine does: caches in host memory map a hit's full blocks from the prefix
    cache, so a later turn reserves its prompt less those blocks; with a GPU (caches on the
    device, a hit copied) it reserves its whole prompt."""
    from refmoe.scheduler import KVBudget

    taken: list[int] = []
    take = KVBudget.take
    monkeypatch.setattr(KVBudget, "take", lambda self, n: (taken.append(n), take(self, n))[1])
    cfg = ModelConfig.from_dict(dict(V3, num_hidden_layers=1, first_k_dense_replace=0))
    convos = agent_workload(2, 3, 1024, (200, 400), (32, 64), (1.0, 2.0), seed=1)
    reserved, records = {}, {}
    for hw in ("zen3-2vcpu-calibrated", "paper-2x9355-2x5090"):
        taken.clear()
        run = Simulation(cfg, Hardware.load(hw), [], conversations=convos).run()
        reserved[hw], records[hw] = sum(taken), run.records
        assert len(taken) == 6 and all(r.outcome.ok for r in run.records)
    shared = sum(r.cached_tokens // 32 * 32 for r in records["zen3-2vcpu-calibrated"])
    assert shared > 2 * 1024
    assert reserved["paper-2x9355-2x5090"] - reserved["zen3-2vcpu-calibrated"] == shared
