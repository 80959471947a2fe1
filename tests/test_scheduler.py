"""The scheduler (refmoe/scheduler.py) on plain plan objects, as a specification: admission is
first come, first served within the KV budget and the queue bound; decode batches every
running request up to max_batch, split in two for dual-batch overlap; with several devices an
SLP prefill takes them all only when decode has been quiet."""

import pytest

from refmoe.scheduler import Entry, QueueFull, Scheduler


def test_admission_is_fcfs_within_the_kv_budget():
    s = Scheduler(kv_tokens=100, max_batch=2, max_queue=3)
    s.add(Entry("a", 30, 30, 0.0))
    s.add(Entry("b", 50, 20, 1.0))
    s.add(Entry("c", 5, 5, 2.0))
    a = s.next_prefill()
    assert a.request_id == "a" and s.kv.used == 60
    assert s.next_prefill() is None  # b (70) does not fit; c may not overtake it
    s.prefilled("a")
    assert s.next_decode().request_ids == ["a"]
    s.finish("a")
    assert s.kv.used == 0 and s.next_prefill().request_id == "b"
    with pytest.raises(ValueError, match="exceeds the KV budget"):
        s.add(Entry("huge", 90, 20, 3.0))


def test_queue_bound_and_batches():
    s = Scheduler(kv_tokens=1000, max_batch=3, max_queue=2, dual_batch=True)
    s.add(Entry("a", 1, 1, 0))
    s.add(Entry("b", 1, 1, 0))
    with pytest.raises(QueueFull):
        s.add(Entry("c", 1, 1, 0))
    for _ in range(2):
        s.prefilled(s.next_prefill().request_id)
    for r in "def":
        s.add(Entry(r, 1, 1, 0))
        s.prefilled(s.next_prefill().request_id)
    plan = s.next_decode()
    assert plan.request_ids == ["a", "b", "d"] and plan.micro_batches == [["a", "b"], ["d"]]
    assert plan.overlapped
    s.finish("b")
    assert s.next_decode().request_ids == ["a", "d", "e"]


def test_devices_policy_keeps_one_for_decode():
    now = [0.0]
    s = Scheduler(
        kv_tokens=10_000,
        choose_path=lambda t, busy, wait_s: "slp" if t >= 100 else "cpu",
        devices=2,
        decode_quiet_s=300,
        clock=lambda: now[0],
    )
    s.add(Entry("long", 500, 4, 0))
    plan = s.next_prefill()
    assert plan.where == "slp" and plan.devices == 2  # nothing decoding: both devices
    s.prefilled("long")
    assert s.next_decode() is not None  # decode ran at t = 0
    s.add(Entry("long2", 500, 4, 0))
    assert s.next_prefill().devices == 1  # one device stays with decode
    s.finish("long")
    s.finish("long2")
    now[0] = 200.0
    s.add(Entry("long3", 500, 4, 0))
    assert s.next_prefill().devices == 1  # decoded 200 s ago: still one
    now[0] = 301.0
    s.add(Entry("long4", 500, 4, 0))
    assert s.next_prefill().devices == 2  # quiet for 5 minutes: both
    s.add(Entry("short", 50, 4, 0))
    assert s.next_prefill().where == "cpu"


def test_a_fixed_state_per_sequence_is_reserved_with_its_tokens():
    """Linear attention (Qwen3-Next, Qwen3.5) keeps a fixed state per sequence beside its
    growing cache: the budget reserves it with every request and returns it at the end."""
    s = Scheduler(kv_tokens=100, max_batch=4, state_tokens=25)
    s.add(Entry("a", 20, 10, 0.0))
    s.add(Entry("b", 20, 10, 1.0))
    assert s.next_prefill().request_id == "a" and s.kv.used == 55
    assert s.next_prefill() is None  # 30 tokens would fit; 30 + its state does not
    s.finish("a")
    assert s.kv.used == 0 and s.next_prefill().request_id == "b" and s.kv.used == 55
    with pytest.raises(ValueError, match="fixed state"):
        s.add(Entry("c", 50, 40, 2.0))  # 90 tokens fit, 90 + 25 do not


def test_fixed_state_tokens():
    from refmoe.policy import fixed_state_tokens

    assert fixed_state_tokens(0, 4096) == 0
    assert fixed_state_tokens(4096, 4096) == 1 and fixed_state_tokens(4097, 4096) == 2
    assert fixed_state_tokens(1000, 0) == 1000  # no per-token cache at all: bytes


def test_a_short_prompt_does_not_queue_behind_a_long_slp_prefill():
    """The agent case (a 201-token turn arriving while another conversation's 4K-token first
    turn streams by SLP for 22 s): the path is chosen with the time the prefill worker stays
    busy, measured from the last prompt of that path there, so with chunked prefill the short
    turn rides the decode steps now instead of waiting for the worker. Measured on this VM
    before the fix: that turn's TTFT 21.9 s where the other later turns took 1.6 s."""
    from refmoe import costmodel
    from refmoe.config import ModelConfig
    from refmoe.policy import EngineConfig, Policy

    now = [0.0]
    seen = []

    def choose(tokens, busy, wait_s):
        seen.append((tokens, round(wait_s, 6)))
        return "slp" if tokens >= 1000 or wait_s == 0 else "cpu"

    s = Scheduler(
        kv_tokens=100_000,
        choose_path=choose,
        clock=lambda: now[0],
        chunk_tokens=lambda decoding, left: left,
    )
    s.add(Entry("a1", 4096, 32, 0))
    assert s.next_prefill().where == "slp" and s.worker_wait() == 0.0  # nothing measured yet
    now[0] = 22.0
    s.prefilled("a1")
    assert s.observed == {"slp": 22.0 / 4096} and s.worker is None  # default: per token
    s.add(Entry("b1", 4096, 32, 0))
    now[0] = 22.5
    assert s.next_prefill().request_id == "b1"
    now[0] = 23.5
    assert s.worker_wait() == pytest.approx(21.0)
    s.add(Entry("a2", 201, 32, 0))
    assert s.next_prefill() is None  # not the worker: chunks on the decode worker
    assert s.next_decode().chunk.request_id == "a2"
    assert seen[-1] == (201, 21.0)
    now[0] = 60.0  # past its expected end: no wait left
    assert s.worker_wait() == 0.0
    s.finish("b1")  # cancelled on the worker: no measurement, the worker is free
    assert s.worker is None and s.observed == {"slp": 22.0 / 4096}
    # the policy adds the wait to SLP only where a CPU prefill would not wait (chunked)
    import dataclasses
    import json
    from pathlib import Path

    trace = Path(__file__).parents[1] / "traces/agents/qwen3-next-L4-E32-2x3-4096.json"
    meta = json.loads(trace.read_text())["metadata"]["model"]  # the Qwen3-Next demo's
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in meta.items() if k in names})
    rates = costmodel.Rates(14.3, 12.0, 113.0, 436.0, device_weight_gbps=2.3, device="cpu")
    for chunked, want in (("on", "cpu"), ("off", "slp")):
        p = Policy.build(EngineConfig(chunked_prefill=chunked), cfg, rates, accelerated=False)
        assert p.path(201) == "slp" and p.path(201, wait_s=21.0) == want
    # the policy's scheduler scales the cost model's estimate (SLP's stream is a fixed cost a
    # rate per token would overcharge a long prompt by), by what the last prompt took
    p = Policy.build(EngineConfig(), cfg, rates, accelerated=False)
    s = p.scheduler(clock=lambda: now[0])
    now[0] = 0.0
    s.add(Entry("short", 201, 8, 0))
    assert s.next_prefill().where == "slp"  # the worker idle: SLP's estimate wins
    now[0] = 1.3
    s.prefilled("short")
    ratio = 1.3 / p.seconds(201, "slp")
    assert s.observed == {"slp": pytest.approx(ratio)}
    s.add(Entry("long", 4096, 8, 0))
    assert s.next_prefill().where == "slp"
    now[0] = 2.3
    assert s.worker_wait() == pytest.approx(ratio * p.seconds(4096, "slp") - 1.0)
    assert p.seconds(4096, "slp") < 4096 / 201 * p.seconds(201, "slp")  # the fixed stream
