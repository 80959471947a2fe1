"""The scheduler's policy on plain plan objects, and the engine's workers on a real model:
batched decode and dual-batch overlap give the tokens a lone request gets; cancel and errors
return the KV reservation; admission is first come, first served within the budget."""

import threading
import time

import pytest
import torch
from test_slp import PROMPT, fp8_dir  # noqa: F401 (fixture)

from refmoe import models
from refmoe.engine import Engine, ShuttingDown
from refmoe.generate import generate
from refmoe.sampling import SamplingParams

# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Engine on the tiny FP8 DeepSeek model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(fp8_dir):  # noqa: F811
    return models.load(fp8_dir)[1]


def _run(engine, prompts, n, params=None):
    done = {i: threading.Event() for i in range(len(prompts))}
    out = {i: [] for i in range(len(prompts))}
    ends = {}

    def sink_for(i):
        def sink(ev):
            if ev["type"] == "token":
                out[i] += ev["token_ids"]
            else:
                ends[i] = ev
                done[i].set()

        return sink

    reqs = [
        engine.submit(p, n, params or SamplingParams(), sink_for(i)) for i, p in enumerate(prompts)
    ]
    for e in done.values():
        assert e.wait(120), "a request never finished"
    return out, ends, reqs


@pytest.mark.parametrize("dual_batch", [False, True])
def test_batched_decode_matches_lone_requests(model, dual_batch):
    prompts = [PROMPT[:11], PROMPT[3:9], PROMPT[:4], PROMPT[10:30]]
    want = [generate(model, p, 10).token_ids for p in prompts]
    engine = Engine(model, max_batch=4, prefill="cpu", dual_batch=dual_batch).start()
    try:
        out, ends, _ = _run(engine, prompts, 10)
        assert [out[i] for i in range(4)] == want
        assert all(
            ends[i]["type"] == "finish" and ends[i]["usage"]["completion_tokens"] == 10
            for i in range(4)
        )
        assert engine.kv_usage == 0 and engine.steps["decode"] >= 9
    finally:
        engine.shutdown(1)


def test_slp_prefill_path_in_the_engine(model):
    engine = Engine(model, prefill="slp").start()
    try:
        out, _, _ = _run(engine, [PROMPT], 6)
        assert out[0] == generate(model, PROMPT, 6).token_ids
    finally:
        engine.shutdown(1)


@pytest.mark.parametrize("prefill, ranks", [("cpu", 1), ("slp", 1), ("slp", 2)])
def test_prompt_logprobs_on_every_prefill_path(model, fp8_dir, prefill, ranks):  # noqa: F811
    """An echo's prompt log-probabilities (SamplingParams.prompt_logprobs) come from every
    position's logits on each prefill path: the CPU one, SLP, and DSLP over two ranks."""
    with torch.no_grad():
        logits = model.forward(torch.tensor(PROMPT), model.new_cache(), logits="all")
    want = torch.log_softmax(logits.double(), -1)
    kw = {"model_dir": str(fp8_dir)} if ranks > 1 else {}
    engine = Engine(model, prefill=prefill, ranks=ranks, **kw).start()
    events, done = [], threading.Event()

    def sink(ev):
        events.append(ev)
        if ev["type"] != "token":
            done.set()

    try:
        engine.submit(PROMPT, 2, SamplingParams(prompt_logprobs=3), sink)
        assert done.wait(120)
    finally:
        engine.shutdown(1)
    (lps,) = [e["prompt_logprobs"] for e in events if "prompt_logprobs" in e]
    assert [x.token for x in lps] == PROMPT and lps[0].logprob is None and lps[0].top is None
    rows = [float(want[i - 1, PROMPT[i]]) for i in range(1, len(PROMPT))]
    assert [x.logprob for x in lps[1:]] == pytest.approx(rows, abs=1e-3)
    assert all(
        len(x.top) == 3 and x.top[0][0] == int(want[i].argmax()) for i, x in enumerate(lps[1:])
    )


def test_kv_budget_in_memory(model):
    """--kv-memory: as many tokens as fit, at the model's own cache bytes per token (MLA: the
    latent and roped key in float32, every layer)."""
    cfg = model.cfg
    per = model.kv_bytes_per_token()
    assert per == cfg.num_hidden_layers * 4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert Engine(model, kv_memory=per * 50.5).scheduler.kv.capacity == 50
    cache = model.new_cache()
    model.forward(torch.tensor(PROMPT), cache)
    assert sum(layer.kv.view().numel() * 4 for layer in cache.layers) == per * len(PROMPT)
    with pytest.raises(ValueError, match="holds no token"):
        Engine(model, kv_memory=per - 1)
    with pytest.raises(ValueError, match="not both"):
        Engine(model, kv_memory=per * 10, kv_tokens=10)


def test_cancel_and_failures_return_the_reservation(model, monkeypatch):
    engine = Engine(model, prefill="cpu", kv_tokens=200).start()
    try:
        seen = threading.Event()

        def sink(ev):
            seen.set()

        req = engine.submit(PROMPT[:5], 100, SamplingParams(), sink)
        assert seen.wait(60)
        engine.cancel(req.id)
        assert req.cancelled
        deadline = time.monotonic() + 30  # freed by the decode worker at its next step
        while engine.kv_usage != 0:
            assert time.monotonic() < deadline, "the cancelled request's KV was never freed"
            time.sleep(0.01)
        # a step that raises fails its requests with an error event, and the engine goes on
        # (a CPU prompt runs on the decode worker, chunked prefill, through forward_batch)
        monkeypatch.setattr(model, "forward", lambda *a, **k: 1 / 0)
        monkeypatch.setattr(model, "forward_batch", lambda *a, **k: 1 / 0)
        _, ends, _ = _run(engine, [PROMPT[:3]], 4)
        assert ends[0]["type"] == "error" and "ZeroDivisionError" in ends[0]["message"]
        assert engine.kv_usage == 0
        monkeypatch.undo()
        out, _, _ = _run(engine, [PROMPT[:3]], 4)
        assert len(out[0]) == 4
        with pytest.raises(ValueError, match="exceeds the context"):
            engine.submit(PROMPT[:3], model.cfg.max_position_embeddings, SamplingParams(), print)
    finally:
        engine.shutdown(1)
    with pytest.raises(ShuttingDown):
        engine.submit(PROMPT[:3], 2, SamplingParams(), print)


def test_dual_batch_locks_alternate(model):
    """Two micro-batches in two threads: while one holds the attention lock the other may
    hold the experts lock, and neither lane is ever held twice at once."""
    held, overlaps = {"attn": 0, "ffn": 0}, []

    class Probe:
        def __init__(self, lane):
            self.lane, self.lock = lane, threading.Lock()

        def __enter__(self):
            self.lock.acquire()
            held[self.lane] += 1
            assert held[self.lane] == 1
            overlaps.append(held["attn"] + held["ffn"])

        def __exit__(self, *exc):
            held[self.lane] -= 1
            self.lock.release()

    locks = (Probe("attn"), Probe("ffn"))
    caches = [model.new_cache() for _ in range(2)]
    seqs = [torch.tensor(PROMPT[:5]), torch.tensor(PROMPT[5:12])]
    t = threading.Thread(target=model.forward_batch, args=([seqs[1]], [caches[1]], locks))
    t.start()
    model.forward_batch([seqs[0]], [caches[0]], locks)
    t.join()
    assert max(overlaps) <= 2 and caches[0].length == 5 and caches[1].length == 7


def test_engine_runs_dslp_when_decode_is_quiet(model, fp8_dir):  # noqa: F811
    engine = Engine(model, prefill="slp", ranks=2, model_dir=str(fp8_dir)).start()
    try:
        out, _, _ = _run(engine, [PROMPT], 5)
        assert engine.group is not None and engine.group.stats.experts_loaded > 0
        assert out[0] == generate(model, PROMPT, 5).token_ids
    finally:
        engine.shutdown(1)
    assert engine.group is None


def test_trace_has_queue_and_kv_counter_tracks(model):
    """Queue depth and KV usage as counter tracks, engine and simulator alike."""
    from refmoe.trace import Trace
    from sim.hardware import Hardware
    from sim.serve import simulate

    trace = Trace()
    engine = Engine(model, prefill="cpu", max_batch=4, trace=trace).start()
    try:
        _run(engine, [PROMPT[:5], PROMPT[2:9]], 3)
    finally:
        engine.shutdown(1)
    measured = [e for e in trace.to_json()["traceEvents"] if e["ph"] == "C"]
    names = {e["name"] for e in measured}
    assert names == {"requests", "kv cache usage"}
    assert max(e["args"].get("running", 0) for e in measured) >= 1
    last = [e for e in measured if e["name"] == "requests"][-1]["args"]
    assert last == {"waiting": 0, "running": 0}
    _, _, sim = simulate(
        model.cfg, Hardware.load("zen3-2vcpu-calibrated"), [(0.0, 5, 3), (0.0, 7, 3)], trace=True
    )
    simulated = [e for e in sim.to_json()["traceEvents"] if e["ph"] == "C"]
    assert {e["name"] for e in simulated} == names
    assert [e for e in simulated if e["name"] == "requests"][-1]["args"] == last
