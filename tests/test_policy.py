"""The one policy seam (refmoe/policy.py): EngineConfig is validated by field; the engine,
`refmoe generate` and the simulator build their scheduler only through Policy, so one request
sequence gets identical plans from the engine's scheduler and the simulator's; plans carry
every decision an executor needs (path, devices and which, chunks, streaming per chunk)."""

import json

import pytest
from test_slp import PROMPT, fp8_dir  # noqa: F401 (fixture)

from refmoe import costmodel, models
from refmoe.engine import Engine
from refmoe.policy import EngineConfig, Policy
from refmoe.scheduler import Entry
from sim.hardware import Hardware
from sim.predict import rates as profile_rates
from sim.serve import policy_for


@pytest.fixture(scope="module")
def model(fp8_dir):  # noqa: F811
    return models.load(fp8_dir)[1]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"prefill": "gpu"}, "prefill must be auto, cpu or slp"),
        ({"dual_batch": "maybe"}, "dual_batch must be auto, on or off"),
        ({"ranks": 0}, "ranks must be >= 1"),
        ({"max_batch": 0}, "max_batch must be >= 1"),
        ({"kv_tokens": 0}, "kv_tokens must be >= 1"),
        ({"chunk_tokens": -5}, "chunk_tokens must be >= 1"),
        ({"decode_quiet_s": -1.0}, "decode_quiet_s must be >= 0"),
    ],
)
def test_engine_config_names_the_bad_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(**kwargs)


def test_dual_batch_spellings_and_defaults(model):
    assert EngineConfig(dual_batch=None).dual_batch == "auto"
    assert EngineConfig(dual_batch=True).dual_batch == "on"
    cfg = model.cfg
    on_gpu = Policy.build(EngineConfig(), cfg, None, accelerated=True)
    on_cpu = Policy.build(EngineConfig(), cfg, None, accelerated=False)
    assert on_gpu.dual_batch and not on_cpu.dual_batch
    assert on_gpu.chunk_tokens == 32768 and on_cpu.chunk_tokens == 8192
    # the engine and the simulator read "auto" the same way: the engine from its device, the
    # simulator from whether the profile has GPUs
    assert not Engine(model).scheduler.dual_batch
    assert policy_for(cfg, Hardware.load("paper-2x9355-2x5090"), EngineConfig()).dual_batch
    assert not policy_for(cfg, Hardware.load("zen3-2vcpu-calibrated"), EngineConfig()).dual_batch


def test_plans_carry_chunks_streaming_and_devices(model):
    cfg = model.cfg
    policy = Policy.build(
        EngineConfig(prefill="slp", ranks=3, chunk_tokens=8), cfg, None, accelerated=True
    )
    s = policy.scheduler(clock=lambda: 1000.0)
    s.add(Entry("a", 20, 4, 0.0))
    plan = s.next_prefill()
    assert (plan.where, plan.devices, plan.device_ids, plan.chunks) == ("slp", 3, (0, 1, 2), 3)
    assert plan.streaming == tuple(costmodel.streaming(cfg, t) for t in (8, 8, 4))
    s.prefilled("a")
    s.next_decode()  # decode is busy: one device stays with it
    s.add(Entry("b", 5, 4, 0.0))
    plan = s.next_prefill()
    assert (plan.devices, plan.device_ids, plan.chunks) == (2, (1, 2), 1)
    cpu = Policy.build(EngineConfig(prefill="cpu", ranks=3), cfg, None, accelerated=True)
    s = cpu.scheduler()
    s.add(Entry("c", 20, 4, 0.0))
    plan = s.next_prefill()
    assert (plan.where, plan.devices, plan.device_ids, plan.chunks, plan.streaming) == (
        "cpu",
        1,
        (2,),
        1,
        (),
    )


def _drive(sched, clock):
    """One request sequence, every plan it produces, in order."""
    plans = []
    steps = [
        ("add", "r0", 4, 6),
        ("add", "r1", 40, 3),
        ("prefill",),
        ("prefill",),
        ("done", "r0"),
        ("decode",),
        ("add", "r2", 9, 2),
        ("prefill",),
        ("done", "r2"),
        ("decode",),
        ("finish", "r0"),
        ("tick", 400.0),
        ("finish", "r1"),
        ("finish", "r2"),
        ("tick", 400.0),
        ("add", "r3", 70, 2),
        ("prefill",),
        ("done", "r3"),
        ("add", "r4", 3, 1),
        ("decode",),
        ("prefill",),
    ]
    for op, *args in steps:
        if op == "add":
            sched.add(Entry(args[0], args[1], args[2], clock.now))
        elif op == "prefill":
            plans.append(sched.next_prefill())
        elif op == "done":
            sched.prefilled(args[0])
        elif op == "decode":
            plans.append(sched.next_decode())
        elif op == "finish":
            sched.finish(args[0])
        else:
            clock.now += args[0]
    return plans


class _Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("prefill", ["auto", "slp", "cpu"])
def test_engine_and_simulator_make_identical_plans(model, fp8_dir, prefill):  # noqa: F811
    hw = Hardware.load("paper-2x9355-2x5090")
    # defaults everywhere but what a CPU-only test machine and a GPU profile must share
    config = EngineConfig(
        prefill=prefill,
        dual_batch="on",
        chunked_prefill="on",
        ranks=2,
        max_batch=3,
        chunk_tokens=32,
    )
    r = profile_rates(hw, 1)
    engine = Engine(model, config=config, rates=r, model_dir=str(fp8_dir))
    sim = policy_for(model.cfg, hw, config).scheduler()
    clocks = _Clock(), _Clock()
    engine.scheduler.clock, sim.clock = clocks
    a, b = _drive(engine.scheduler, clocks[0]), _drive(sim, clocks[1])
    assert a == b
    assert engine.scheduler.kv.capacity == sim.kv.capacity == 4 * model.cfg.max_position_embeddings
    # CPU-path prompts run in chunks on the decode worker (chunked prefill on)
    paths = {p.where for p in a if hasattr(p, "where")}
    paths |= {"cpu" for p in a if getattr(p, "chunk", None) is not None}
    if prefill == "auto":  # the cost model on the profile's rates, the same for both
        assert paths == {
            costmodel.choose_prefill(model.cfg, t, r, 32).path for t in (4, 40, 9, 70, 3)
        }
    else:
        assert paths == {prefill}
    assert any(p.devices == 2 for p in a if hasattr(p, "devices")) == ("slp" in paths)


def test_engine_and_simulator_agree_without_a_gpu(model):  # noqa: F811
    """On a CPU-only profile the simulator's policy streams as the engine's does (the CPU is
    SLP's device there): the same plans from the same rates, and the rates "auto" chose by
    go into the engine's trace, where sim.validate replays them."""
    import dataclasses

    from refmoe.trace import Trace
    from sim.validate import engine_rates

    hw = Hardware.load("zen3-2vcpu-calibrated")
    hw.cpu.slp_copy_gbps, hw.cpu.slp_dequant_gbps, hw.cpu.slp_gflops = 20.0, 50.0, 400.0
    config = EngineConfig(prefill="auto", max_batch=3, chunk_tokens=32)
    r = profile_rates(hw, 1)
    trace = Trace()
    engine = Engine(model, config=config, rates=r, trace=trace)
    policy = policy_for(model.cfg, hw, config)
    assert engine.policy.can_stream and policy.can_stream
    assert not engine.policy.accelerated and not policy.accelerated
    sim = policy.scheduler()
    clocks = _Clock(), _Clock()
    engine.scheduler.clock, sim.clock = clocks
    assert _drive(engine.scheduler, clocks[0]) == _drive(sim, clocks[1])
    engine.start()
    engine.shutdown(1)
    recorded = trace.metadata["engine"]["rates"]
    assert recorded == dataclasses.asdict(r) and engine_rates(trace.metadata["engine"]) == r


def test_generate_with_ranks_asks_the_cost_model(fp8_dir, monkeypatch, capsys):  # noqa: F811
    """--ranks N --prefill auto no longer always runs DSLP: it takes the plan the cost model
    makes from the machine's rates (fixed here: measured ones move with the load), CPU when
    the CPU kernels win, DSLP when streaming does."""
    from refmoe import cli, slp

    args = [
        "generate",
        "--model",
        str(fp8_dir),
        "--prompt-ids",
        ",".join(map(str, PROMPT[:6])),
        "--max-tokens",
        "2",
        "--ranks",
        "2",
        "--prefill",
        "auto",
        "--json",
    ]
    slow_link = costmodel.Rates(h2d_gbps=0.01, cpu_gemv_gbps=20, cpu_gflops=100, device_gflops=100)
    fast_link = costmodel.Rates(
        h2d_gbps=1e6, cpu_gemv_gbps=0.001, cpu_gflops=0.001, device_gflops=1e6
    )
    got = {}
    for name, rates in (("cpu", slow_link), ("dslp", fast_link)):
        monkeypatch.setattr(slp, "model_rates", lambda model, device=None, r=rates: r)
        assert cli.main(args) == 0
        got[name] = json.loads(capsys.readouterr().out)
    assert got["cpu"]["prefill"] == "cpu" and got["dslp"]["prefill"] == "dslp"
    assert got["cpu"]["token_ids"] == got["dslp"]["token_ids"]


def test_simulator_models_by_name_and_context():
    """Published configs ship by name; a request the model cannot hold is refused, by the
    simulator's serve as by the engine."""
    from sim import catalog
    from sim.serve import simulate

    assert {"deepseek-v3", "kimi-k2", "qwen3-235b-a22b"} <= set(catalog.names())
    v3 = catalog.load("deepseek-v3")
    assert (v3.max_position_embeddings, v3.n_routed_experts, v3.is_fp8) == (163840, 256, True)
    assert catalog.load("kimi-k2").num_attention_heads == 64
    with pytest.raises(ValueError, match="not a model this simulator ships"):
        catalog.resolve("deepseek-v9")
    with pytest.raises(ValueError, match="exceed its context of 163,840"):
        catalog.check_context(v3, 163_000, 1_000, "deepseek-v3")
    q = catalog.load("qwen3-30b-a3b")
    hw = Hardware.load("paper-2x9355-2x5090")
    out, _ = simulate(q, hw, [(0.0, 40_000, 1_000), (0.0, 64, 4)])
    assert "exceeds the context of 40960" in out[0].error and not out[0].ok
    assert out[1].ok


def test_hardware_profile_fields_are_named():
    """A missing required field or an unknown one is named (was a TypeError from __init__)."""
    from pathlib import Path

    import yaml

    path = Path(__file__).parent.parent / "sim" / "profiles" / "paper-2x9355-2x5090.yaml"
    d = yaml.safe_load(path.read_text())
    del d["gpus"][0]["name"]
    with pytest.raises(ValueError, match=r"gpus\[0\]: missing required field\(s\) name"):
        Hardware.from_dict(d, "x.yaml")
    d = yaml.safe_load(path.read_text())
    d["cpu"]["dram_gb"] = 3
    with pytest.raises(ValueError, match="cpu: unknown field"):
        Hardware.from_dict(d, "x.yaml")
