"""`refmoe bench serve`: the serving benchmark.

poisson        a real server (uvicorn on a loopback port) and streaming HTTP clients: requests
               arrive as a Poisson process over a prompt/output length mix; prints vLLM's
               "Serving Benchmark Result" block and writes the request CSV
               (arrived_at,num_prefill_tokens,num_decode_tokens) and the engine's Chrome trace
interference   TPOT of a decoding request while a long prompt prefills, over its TPOT alone
dual-batch     aggregate decode tok/s of two concurrent requests over one (batched decode;
               dual-batch overlap where the engine turns it on)
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import threading
import time

from refmoe.serving_metrics import Outcome, as_rows, format_summary, summary, workload, write_csv  # noqa: F401


async def _client(
    base: str, arrival: float, start: float, ids: list[int], max_tokens: int, outcome: Outcome
) -> None:
    import httpx

    await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
    sent = time.perf_counter()
    last = None
    try:
        async with httpx.AsyncClient(timeout=None) as client:
            async with client.stream(
                "POST",
                base + "/v1/completions",
                json={
                    "prompt": ids,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "ignore_eos": True,
                },
            ) as resp:
                if resp.status_code != 200:
                    outcome.error = f"HTTP {resp.status_code}: {await resp.aread()!r}"
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        outcome.error = ev["error"]["message"]
                        return
                    n = sum(len(c.get("token_ids", [])) for c in ev["choices"])
                    if not n:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        outcome.ttft_s = now - sent
                    else:
                        outcome.itl_s.append(now - last)
                    last = now
                    outcome.output_tokens += n
        outcome.e2e_s = time.perf_counter() - sent
        outcome.ok = True
    except Exception as e:  # noqa: BLE001 - recorded per request
        outcome.error = f"{type(e).__name__}: {e}"


def run_poisson(
    model,
    model_dir: str,
    requests: list[tuple[float, int, int]],
    trace=None,
    seed: int = 0,
    engine_kwargs: dict | None = None,
) -> tuple[list[Outcome], float]:
    """Serve `model` over HTTP and replay the requests with streaming clients."""
    import socket

    import uvicorn

    from refmoe.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(
        model_dir,
        model=model,
        served_name="bench",
        engine_kwargs={**(engine_kwargs or {}), "trace": trace},
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark's server never became ready")
        time.sleep(0.1)
    rng = random.Random(seed)
    vocab = model.cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(p)] for _, p, _ in requests]
    # The clients run in a process of their own, as a benchmark's clients would: in the
    # server's process their Python would take turns with the engine's workers for the GIL
    # and show up in the engine's latencies.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes, duration = pool.submit(_drive, base, requests, prompts).result()
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return outcomes, duration


def _drive(
    base: str, requests: list[tuple[float, int, int]], prompts: list[list[int]]
) -> tuple[list[Outcome], float]:
    """The clients' side of run_poisson: every request as a streaming client at its arrival
    time; returns the outcomes and the wall time from the first arrival slot to the last
    finish."""
    outcomes = [Outcome(a, p) for a, p, _ in requests]

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(
            *[
                _client(base, a, start, ids, o, oc)
                for (a, _, o), ids, oc in zip(requests, prompts, outcomes)
            ]
        )
        return time.perf_counter() - start

    return outcomes, asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Interference and dual-batch, on the engine directly (token times from its own thread)
# ---------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self):
        self.times: list[float] = []
        self.done = threading.Event()

    def __call__(self, ev: dict) -> None:
        if ev["type"] == "token":
            self.times.extend([time.perf_counter()] * len(ev["token_ids"]))
        else:
            self.done.set()


def interference(
    model, decode_tokens: int = 24, prefill_tokens: int = 512, prefill: str = "auto", seed: int = 0
) -> dict:
    """Median inter-token time of one decoding request alone, then while a prompt of
    prefill_tokens tokens prefills beside it (prefill and decode workers concurrently)."""
    from refmoe.engine import Engine
    from refmoe.sampling import SamplingParams

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(model.cfg.vocab_size) for _ in range(n)]  # noqa: E731
    engine = Engine(model, prefill=prefill, max_batch=4).start()
    try:
        alone = _Timer()
        engine.submit(ids(16), decode_tokens, SamplingParams(), alone)
        alone.done.wait()
        mixed, long = _Timer(), _Timer()
        engine.submit(ids(16), 4 * decode_tokens, SamplingParams(), mixed)
        while len(mixed.times) < 3:
            time.sleep(0.005)
        t0 = time.perf_counter()
        engine.submit(ids(prefill_tokens), 1, SamplingParams(), long)
        long.done.wait()
        t1 = time.perf_counter()
        mixed.done.wait()
    finally:
        engine.shutdown(1)
    gaps = lambda ts: [b - a for a, b in zip(ts, ts[1:])]  # noqa: E731
    during = [b - a for a, b in zip(mixed.times, mixed.times[1:]) if a < t1 and b > t0]
    base = statistics.median(gaps(alone.times[1:]))
    worst = max(during) if during else float("nan")
    mean_during = statistics.fmean(during) if during else float("nan")
    return {
        "op": "interference",
        "prefill_tokens": prefill_tokens,
        "prefill_s": t1 - t0,
        "tpot_alone_ms": base * 1e3,
        "tpot_during_prefill_ms": mean_during * 1e3,
        "worst_itl_during_prefill_ms": worst * 1e3,
        "ratio": mean_during / base,
        "limit": 1.15,
    }


def dual_batch(model, tokens: int = 24, dual: bool | None = None, seed: int = 0) -> dict:
    """Aggregate decode tok/s: two requests decoding together over one alone."""
    from refmoe.engine import Engine
    from refmoe.sampling import SamplingParams

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(model.cfg.vocab_size) for _ in range(n)]  # noqa: E731
    engine = Engine(model, prefill="cpu", max_batch=4, dual_batch=dual).start()

    def decode_rate(timers: list[_Timer]) -> float:
        """Tokens per second while every request of the group was decoding."""
        lo = max(t.times[0] for t in timers)
        hi = min(t.times[-1] for t in timers)
        n = sum(sum(1 for x in t.times if lo < x <= hi) for t in timers)
        return n / (hi - lo)

    try:
        one = _Timer()
        engine.submit(ids(8), tokens, SamplingParams(), one)
        one.done.wait()
        pair = [_Timer(), _Timer()]
        for t in pair:
            engine.submit(ids(8), tokens, SamplingParams(), t)
        for t in pair:
            t.done.wait()
    finally:
        engine.shutdown(1)
    r1, r2 = decode_rate([one]), decode_rate(pair)
    return {
        "op": "dual_batch",
        "overlap": engine.scheduler.dual_batch,
        "tok_s_one": r1,
        "tok_s_two": r2,
        "ratio": r2 / r1,
        "limit": 1.5,
    }
