"""Chunked CPU prefill: the rule (refmoe/chunking.py) sizes chunks from measured step times and
paces them so the decode steps' mean time grows by at most the slowdown; the scheduler hands a
CPU-path prompt to the decode steps while others decode; the engine's chunked prompt generates
what a whole prefill gives, and cancelling it mid-way frees everything."""

import threading

import pytest
from test_engine import _run, model  # noqa: F401 (fixture)
from test_slp import PROMPT, fp8_dir  # noqa: F401 (fixture)

from refmoe.chunking import ChunkRule
from refmoe.engine import Engine
from refmoe.generate import generate
from refmoe.sampling import SamplingParams
from refmoe.scheduler import Entry, Scheduler


def test_rule_measures_first_then_sizes_chunks_from_step_times():
    rule = ChunkRule(slowdown=1.25, stall=2.0)
    assert rule.tokens(0, 500) == 500  # nobody decoding: the whole rest at once
    assert rule.tokens(1, 500) == 0  # no decode step measured yet
    rule.observe(1, 0, 0.100)
    assert rule.tokens(1, 500) == 1  # one token measures what a token adds
    rule.observe(1, 1, 0.150)  # +50 ms for one token
    assert rule.token_s == pytest.approx(0.05)
    assert rule.debt_s == pytest.approx(0.05 - 0.25 * 0.100)
    assert rule.tokens(1, 500) == 0  # not paid for yet
    rule.observe(1, 0, 0.100)  # pays back 25 ms
    assert rule.debt_s == 0 and rule.tokens(1, 500) == 2  # slow start: twice the last chunk
    rule.observe(1, 2, 0.200)  # +100 ms for two tokens: c stays 50 ms
    for _ in range(4):  # 100 - 25 ms of debt, paid back 25 ms a step
        rule.observe(1, 0, 0.100)
    assert rule.debt_s == 0 and rule.tokens(1, 500) == 4  # stall 2 x 100 ms / 50 ms
    assert rule.tokens(1, 3) == 3
    assert rule.decode_s(2) == pytest.approx(0.2)  # unseen batch: scaled from the nearest
    with pytest.raises(ValueError, match="slowdown"):
        ChunkRule(slowdown=1.0)


def test_pacing_bounds_the_mean_slowdown():
    """A machine where a decode step takes 100 ms and each prompt token adds 30 ms: over a
    2,048-token prefill the mean step time stays within the slowdown, the worst step within
    1 + stall steps."""
    rule = ChunkRule(slowdown=1.25, stall=2.0)
    left, steps = 2048, []
    while left:
        n = min(left, rule.tokens(1, left))
        t = 0.100 + 0.030 * n
        rule.observe(1, n, t)
        steps.append(t)
        left -= n
    mean = sum(steps) / len(steps)
    assert mean <= 1.25 * 0.100 * 1.01 and max(steps) <= 0.100 * 3.01
    assert mean >= 1.2 * 0.100  # and the prefill does use what it is given


def test_scheduler_hands_cpu_prompts_to_decode_steps():
    """CPU-path prompts run in chunks on the decode worker, never whole beside decoding
    requests; a shorter prompt that arrives while a longer one is part-way goes first."""
    sizes = [10, 0, 5, 3, 100, 0]
    asked = []

    def rule(decoding, left):
        asked.append((decoding, left))
        return sizes.pop(0)

    s = Scheduler(kv_tokens=10_000, chunk_tokens=rule)
    s.add(Entry("a", 10, 5, 0))
    assert s.next_prefill() is None  # CPU path: the decode worker runs it
    plan = s.next_decode()
    assert plan.request_ids == [] and (plan.chunk.request_id, plan.chunk.last) == ("a", True)
    s.chunked("a", 10)
    s.prefilled("a")
    s.add(Entry("b", 20, 5, 0))
    plan = s.next_decode()
    assert plan.request_ids == ["a"] and plan.chunk is None  # the rule said 0 this step
    assert s.chunking == ["b"] and s.state("b") == "prefilling" and s.kv.used == 15 + 25
    plan = s.next_decode()
    assert (plan.chunk.request_id, plan.chunk.start, plan.chunk.tokens) == ("b", 0, 5)
    s.chunked("b", 5)
    s.add(Entry("c", 3, 5, 0))  # a short one arrives: it has fewer tokens left than b's 15
    plan = s.next_decode()
    assert (plan.chunk.request_id, plan.chunk.tokens, plan.chunk.last) == ("c", 3, True)
    s.chunked("c", 3)
    s.prefilled("c")
    plan = s.next_decode()
    assert (plan.chunk.request_id, plan.chunk.start, plan.chunk.tokens) == ("b", 5, 15)
    s.chunked("b", 15)
    s.prefilled("b")
    assert s.chunking == [] and s.next_decode().request_ids == ["a", "c", "b"]
    assert asked[:3] == [(0, 10), (1, 20), (1, 20)]
    s.add(Entry("d", 20, 5, 0))
    s.next_decode()  # d starts chunking (the rule says 0)
    s.finish("d")  # cancelled mid-prompt: its reservation returns
    assert s.chunking == [] and s.kv.used == 15 + 8 + 25


def test_engine_chunked_prompt_matches_a_whole_prefill(model):  # noqa: F811
    """A prompt that arrives while another request decodes runs in chunks along its steps;
    both generate what they generate alone."""
    engine = Engine(model, prefill="cpu", max_batch=4).start()
    first, second = PROMPT[:9], PROMPT[5:50]
    try:
        got, started = {}, threading.Event()
        done = {0: threading.Event(), 1: threading.Event()}

        def sink_for(i):
            def sink(ev):
                if ev["type"] == "token":
                    got.setdefault(i, []).extend(ev["token_ids"])
                    started.set()
                else:
                    done[i].set()

            return sink

        engine.submit(first, 40, SamplingParams(), sink_for(0))
        assert started.wait(60)
        engine.submit(second, 6, SamplingParams(), sink_for(1))
        assert done[0].wait(120) and done[1].wait(120)
        assert got[0] == generate(model, first, 40).token_ids
        assert got[1] == generate(model, second, 6).token_ids
        assert engine.chunks.token_s is not None  # chunks ran and were measured
        assert engine.kv_usage == 0
    finally:
        engine.shutdown(1)


def test_engine_without_chunking_runs_prompts_whole(model):  # noqa: F811
    engine = Engine(model, prefill="cpu", chunked_prefill=False).start()
    try:
        out, _, _ = _run(engine, [PROMPT[:9], PROMPT[5:50]], 5)
        assert out[1] == generate(model, PROMPT[5:50], 5).token_ids
        assert engine.chunks.token_s is None and engine.scheduler.chunk_tokens is None
    finally:
        engine.shutdown(1)


def test_a_planning_error_fails_its_requests_not_the_worker(model):  # noqa: F811
    """A bug in the scheduler (or the rule it calls) must not kill a worker thread, which would
    leave every client waiting forever: the requests it holds fail with the error, and the
    next request is served."""
    engine = Engine(model, prefill="cpu")
    real, calls = engine.scheduler.next_decode, []

    def flaky():
        if engine.scheduler.decoding and not calls:
            calls.append(1)
            raise ZeroDivisionError("float division by zero")
        return real()

    engine.scheduler.next_decode = flaky
    engine.start()
    try:
        out, ends, _ = _run(engine, [PROMPT[:9]], 5)
        assert ends[0]["type"] == "error" and "ZeroDivisionError" in ends[0]["message"]
        out, ends, _ = _run(engine, [PROMPT[:9]], 5)
        assert ends[0]["type"] == "finish" and out[0] == generate(model, PROMPT[:9], 5).token_ids
        assert engine.kv_usage == 0
    finally:
        engine.shutdown(1)


def test_a_chunk_measured_faster_than_the_step_stays_bounded():
    rule = ChunkRule(slowdown=1.2, stall=2.0)
    rule.observe(1, 0, 0.100)
    rule.observe(1, 1, 0.090)  # noise: the step with a chunk ran faster than the average
    assert rule.token_s > 0 and rule.tokens(1, 10_000) <= 2 * 256


def test_one_step_measured_as_free_does_not_make_a_huge_chunk():
    """Measured: a first chunk step that ran faster than the decode average (noise) made the
    next chunk 512 tokens, a 5-second stall. A chunk at most doubles the last one."""
    rule = ChunkRule(slowdown=1.2, stall=2.0)
    rule.observe(1, 0, 0.0837)
    assert rule.tokens(1, 4096) == 1
    rule.observe(1, 1, 0.0738)  # faster than the decode step alone
    sizes = []
    for _ in range(5):
        n = rule.tokens(1, 4096)
        sizes.append(n)
        if n:
            rule.observe(1, n, 0.0837 + 0.03 * n)
        else:
            rule.observe(1, 0, 0.0837)
    ran = [n for n in sizes if n]
    assert ran[0] == 2 and all(b <= 2 * a for a, b in zip(ran, ran[1:]))


def test_a_long_prompt_is_not_starved_by_short_ones():
    """Shortest first, but a prompt passed over MAX_PASSED times runs the next chunk."""
    from refmoe.scheduler import MAX_PASSED

    s = Scheduler(kv_tokens=100_000, chunk_tokens=lambda decoding, left: min(left, 4))
    s.add(Entry("long", 1000, 1, 0))
    assert s.next_decode().chunk.request_id == "long"
    s.chunked("long", 4)
    ran = []
    for i in range(2 * MAX_PASSED + 2):
        s.add(Entry(f"short{i}", 3, 1, 0))  # always fewer tokens left than the long one
        plan = s.next_decode()
        ran.append(plan.chunk.request_id)
        s.chunked(plan.chunk.request_id, plan.chunk.tokens)
        if plan.chunk.last:
            s.prefilled(plan.chunk.request_id)
            s.finish(plan.chunk.request_id)
    assert ran[:MAX_PASSED] == [f"short{i}" for i in range(MAX_PASSED)]
    assert ran[MAX_PASSED] == ran[2 * MAX_PASSED + 1] == "long" and ran.count("long") == 2


def test_observe_steps_is_observe_for_each():
    """observe_steps (the simulator's blocks of decode steps) leaves the rule exactly as
    observe called once per step: the step time's average and the debt, bit for bit, with a
    chunk's debt outstanding and without."""
    import random

    rng = random.Random(3)
    for debt in (0.0, 0.5):
        one, many = ChunkRule(slowdown=1.2), ChunkRule(slowdown=1.2)
        for rule in (one, many):
            rule.observe(2, 0, 0.1)
            rule.debt_s = debt
        steps = [rng.uniform(0.01, 0.2) for _ in range(50)]
        for s in steps:
            one.observe(2, 0, s)
        many.observe_steps(2, steps)
        many.observe_steps(0, steps)  # no request decoding: nothing to observe
        assert (one.step_s, one.debt_s) == (many.step_s, many.debt_s)
    fresh = ChunkRule()
    fresh.observe_steps(3, [0.3, 0.1])
    alone = ChunkRule()
    alone.observe(3, 0, 0.3)
    alone.observe(3, 0, 0.1)
    assert fresh.step_s == alone.step_s and fresh.debt_s == alone.debt_s
