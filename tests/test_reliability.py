"""Nothing one client does harms another: cancels at any point of a request's life (waiting,
prefilling, between and during decode steps, from the sink itself), sinks that raise, and the
gauges that report it all. Every surviving request ends with exactly the tokens it gets alone
(greedy), and the KV budget returns to zero."""

import random
import threading
import time

import pytest
from test_slp import PROMPT, fp8_dir  # noqa: F401 (fixture)

from refmoe import models
from refmoe.engine import Engine
from refmoe.generate import generate
from refmoe.metrics import Metrics
from refmoe.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(fp8_dir):  # noqa: F811
    return models.load(fp8_dir)[1]


class Client:
    """One request's sink: records tokens and the end; may hang up after `hang_after` tokens
    (cancel from inside the sink, as a server's disconnect handler can) or raise."""

    def __init__(self, engine, hang_after=None, raise_after=None):
        self.engine, self.hang_after, self.raise_after = engine, hang_after, raise_after
        self.tokens, self.end, self.done = [], None, threading.Event()
        self.req = None

    def __call__(self, ev):
        if ev["type"] == "token":
            self.tokens += ev["token_ids"]
            if self.raise_after is not None and len(self.tokens) >= self.raise_after:
                raise BrokenPipeError("the client's socket is gone")
            if self.hang_after is not None and len(self.tokens) >= self.hang_after:
                self.engine.cancel(self.req.id)
        else:
            self.end = ev
            self.done.set()


def _wait_idle(engine, timeout=60):
    deadline = time.monotonic() + timeout
    while engine.kv_usage != 0 or engine.requests:
        assert time.monotonic() < deadline, (
            f"KV {engine.kv_usage} and requests {list(engine.requests)} never freed"
        )
        time.sleep(0.01)


@pytest.mark.parametrize("dual_batch", [False, True])
def test_random_disconnects_never_touch_survivors(model, dual_batch):
    rng = random.Random(7 + dual_batch)
    keep = [PROMPT[i : i + 4 + i % 5] for i in range(6)]
    n_keep = 14
    want = [generate(model, p, n_keep).token_ids for p in keep]
    metrics = Metrics("tiny")
    engine = Engine(
        model, prefill="cpu", max_batch=16, dual_batch=dual_batch, metrics=metrics
    ).start()
    try:
        survivors = []
        doomed = []
        for p in keep:
            c = Client(engine)
            c.req = engine.submit(p, n_keep, SamplingParams(), c)
            survivors.append(c)
            for _ in range(4):  # four doomed requests beside each survivor
                how = rng.choice(["sink", "thread", "raise", "waiting"])
                prompt = PROMPT[rng.randrange(20) :][: rng.randint(2, 12)]
                d = Client(
                    engine,
                    hang_after=rng.randint(1, 6) if how == "sink" else None,
                    raise_after=rng.randint(1, 6) if how == "raise" else None,
                )
                d.req = engine.submit(prompt, 40, SamplingParams(), d)
                doomed.append(d)
                if how in ("thread", "waiting"):  # from another thread, at a random time
                    delay = 0.0 if how == "waiting" else rng.uniform(0, 0.3)
                    threading.Timer(delay, engine.cancel, (d.req.id,)).start()
        for c in survivors:
            assert c.done.wait(180), "a surviving request never finished"
        for c, w in zip(survivors, want):
            assert c.end["type"] == "finish", c.end
            assert c.tokens == w
        for d in doomed:  # none of them failed with an error of the engine's
            assert d.end is None or d.end["type"] == "finish", d.end
        _wait_idle(engine)
        running = metrics.running._value.get()
        waiting = metrics.waiting._value.get()
        assert (running, waiting) == (0, 0)
    finally:
        engine.shutdown(1)


def test_gauges_follow_every_state_change(model):
    """Four decoding requests are four running, none waiting (was reported 1 and 3). Each may
    generate up to 240 tokens (the tiny model's context is 256): the first request has 14-26
    tokens by the time the last one's second arrives (measured), and with 60 it could finish
    under load before the gauges were read (a CI run saw 1 running)."""
    metrics = Metrics("tiny")
    engine = Engine(model, prefill="cpu", max_batch=8, metrics=metrics).start()
    try:
        clients = [Client(engine) for _ in range(4)]
        for i, c in enumerate(clients):
            c.req = engine.submit(PROMPT[i : i + 5], 240, SamplingParams(), c)
        deadline = time.monotonic() + 60
        while min(len(c.tokens) for c in clients) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert all(c.end is None for c in clients), [len(c.tokens) for c in clients]
        assert metrics.running._value.get() == 4
        assert metrics.waiting._value.get() == 0
        for c in clients:
            engine.cancel(c.req.id)
        _wait_idle(engine)
        assert metrics.running._value.get() == 0
    finally:
        engine.shutdown(1)
