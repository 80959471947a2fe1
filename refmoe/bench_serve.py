"""`refmoe bench serve`: the serving benchmark.

poisson        a real server (uvicorn on a loopback port) and streaming HTTP clients: requests
               arrive as a Poisson process over a prompt/output length mix; prints vLLM's
               "Serving Benchmark Result" block and writes the request CSV
               (arrived_at,num_prefill_tokens,num_decode_tokens) and the engine's Chrome trace
agent          N conversations through the real server, each resending its whole history
               plus a few hundred new tokens every turn, with think time between turns:
               the usual block plus TTFT by turn, the prefix cache's hit rate, and the decode
               of other requests while a prompt prefills
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
from contextlib import contextmanager

from refmoe.serving_metrics import (  # noqa: F401
    Outcome,
    Turn,
    TurnRecord,
    as_rows,
    format_summary,
    summary,
    workload,
    write_csv,
)


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


@contextmanager
def _serving(model, model_dir: str, trace=None, engine_kwargs: dict | None = None):
    """A real server for `model` (uvicorn on a loopback port, in a thread), ready; yields its
    base URL."""
    import socket

    import httpx
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
    deadline = time.monotonic() + 600
    try:
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark's server never became ready")
            time.sleep(0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _in_client_process(fn, *args):
    """fn(*args) in a process of its own, as a benchmark's clients would run: in the server's
    process their Python would take turns with the engine's workers for the GIL and show up in
    the engine's latencies."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_poisson(
    model,
    model_dir: str,
    requests: list[tuple[float, int, int]],
    trace=None,
    seed: int = 0,
    engine_kwargs: dict | None = None,
) -> tuple[list[Outcome], float]:
    """Serve `model` over HTTP and replay the requests with streaming clients."""
    rng = random.Random(seed)
    vocab = model.cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(p)] for _, p, _ in requests]
    with _serving(model, model_dir, trace, engine_kwargs) as base:
        return _in_client_process(_drive, base, requests, prompts)


def run_agents(
    model,
    model_dir: str,
    conversations: list[list[Turn]],
    trace=None,
    seed: int = 0,
    engine_kwargs: dict | None = None,
) -> tuple[list[TurnRecord], float]:
    """Serve `model` over HTTP; each conversation a client that sends its turns one after the
    other, every turn the whole history (its prompts and the replies it got) plus new tokens."""
    with _serving(model, model_dir, trace, engine_kwargs) as base:
        return _in_client_process(_drive_agents, base, conversations, model.cfg.vocab_size, seed)


def _drive_agents(
    base: str, conversations: list[list[Turn]], vocab: int, seed: int
) -> tuple[list[TurnRecord], float]:
    import httpx

    rng = random.Random(seed)
    records: list[TurnRecord] = []

    async def turn(client, start, c, k, history, t: Turn) -> tuple[TurnRecord, list[int]]:
        ids = history + [rng.randrange(vocab) for _ in range(t.new_tokens)]
        rec = TurnRecord(c, k, Outcome(time.perf_counter() - start, len(ids)))
        records.append(rec)
        rec.sent_s = time.perf_counter() - start
        out: list[int] = []
        body = {
            "prompt": ids,
            "max_tokens": t.output_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", base + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.outcome.error = f"HTTP {resp.status_code}: {await resp.aread()!r}"
                return rec, ids + out
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    rec.outcome.error = ev["error"]["message"]
                    return rec, ids + out
                if ev.get("usage"):
                    details = ev["usage"].get("prompt_tokens_details") or {}
                    rec.cached_tokens = details.get("cached_tokens", 0)
                got = [i for ch in ev["choices"] for i in ch.get("token_ids", [])]
                if got:
                    rec.token_times += [time.perf_counter() - start] * len(got)
                    out += got
        o = rec.outcome
        o.output_tokens = len(out)
        if rec.token_times:
            o.ttft_s = rec.token_times[0] - rec.sent_s
            o.itl_s = [b - a for a, b in zip(rec.token_times, rec.token_times[1:])]
            o.e2e_s = rec.token_times[-1] - rec.sent_s
            o.ok = True
        return rec, ids + out

    async def conversation(client, start, c: int, turns: list[Turn]) -> None:
        history: list[int] = []
        for k, t in enumerate(turns, 1):
            await asyncio.sleep(t.think_s)
            rec, history = await turn(client, start, c, k, history, t)
            if not rec.outcome.ok:
                return  # a failed turn ends its conversation

    async def main() -> float:
        start = time.perf_counter()
        async with httpx.AsyncClient(timeout=None) as client:
            await asyncio.gather(
                *[conversation(client, start, c, ts) for c, ts in enumerate(conversations)]
            )
        return time.perf_counter() - start

    duration = asyncio.run(main())
    return sorted(records, key=lambda r: (r.conversation, r.turn)), duration


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
    model,
    decode_tokens: int = 24,
    prefill_tokens: int = 512,
    prefill: str = "auto",
    seed: int = 0,
    engine_kwargs: dict | None = None,
) -> dict:
    """One decoding request alone (its median inter-token time); the prompt of prefill_tokens
    tokens alone (its prefill time); then the prompt arriving while the request decodes (the
    prefill and decode workers, or chunked prefill along the decode steps): the request's mean
    inter-token time during the prefill over alone, and the prefill's time over alone."""
    from refmoe.engine import Engine
    from refmoe.sampling import SamplingParams

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(model.cfg.vocab_size) for _ in range(n)]  # noqa: E731
    kw = {"prefill": prefill, "max_batch": 4, **(engine_kwargs or {})}
    kw.setdefault("prefix_cache_gib", 0)  # every prompt here is new; keep the cache out of it
    engine = Engine(model, **kw).start()
    try:
        alone = _Timer()
        engine.submit(ids(16), decode_tokens, SamplingParams(), alone)
        alone.done.wait()
        lone = _Timer()
        t = time.perf_counter()
        engine.submit(ids(prefill_tokens), 1, SamplingParams(), lone)
        lone.done.wait()
        prefill_alone = time.perf_counter() - t
        # the decoding request runs until the prompt's first token, however long that takes
        mixed, long = _Timer(), _Timer()
        limit = min(1 << 20, engine.context - 17)
        req = engine.submit(ids(16), limit, SamplingParams(), mixed)
        while len(mixed.times) < 3:
            time.sleep(0.005)
        t0 = time.perf_counter()
        engine.submit(ids(prefill_tokens), 1, SamplingParams(), long)
        long.done.wait()
        t1 = time.perf_counter()
        # the request alone again, now at the context it reached: its decode steps read a
        # longer cache than at the start, which is no fault of the prefill's
        ended = len(mixed.times)
        while len(mixed.times) < ended + decode_tokens:
            time.sleep(0.005)
        engine.cancel(req.id)  # (a cancelled request gets no further event)
        rule = engine.chunks
    finally:
        engine.shutdown(1)
    gaps = lambda ts: [b - a for a, b in zip(ts, ts[1:])]  # noqa: E731
    during = [b - a for a, b in zip(mixed.times, mixed.times[1:]) if a < t1 and b > t0]
    before = statistics.median(gaps(alone.times[1:]))
    after = statistics.median(gaps(mixed.times[ended + 1 :]))
    # alone over the same contexts: the step time grows about linearly with the context, from
    # where the request started to where it ended
    base = (before + after) / 2
    worst = max(during) if during else float("nan")
    mean_during = statistics.fmean(during) if during else float("nan")
    return {
        "op": "interference",
        "prefill_tokens": prefill_tokens,
        "chunked_prefill": engine.policy.chunked,
        "prefill_s": t1 - t0,
        "prefill_alone_s": prefill_alone,
        "prefill_slowdown": (t1 - t0) / prefill_alone,
        "tpot_alone_ms": base * 1e3,
        "tpot_alone_start_ms": before * 1e3,
        "tpot_alone_end_ms": after * 1e3,
        "tpot_during_prefill_ms": mean_during * 1e3,
        "worst_itl_during_prefill_ms": worst * 1e3,
        "tokens_during_prefill": len(during),
        "chunks": rule.chunks_run,
        "mean_chunk_tokens": rule.tokens_run / rule.chunks_run if rule.chunks_run else None,
        "ratio": mean_during / base,
        "ratio_to_start": mean_during / before,
        "limit": 1.15 if model.device.type != "cpu" else 1.25,
    }


def dual_batch(model, tokens: int = 24, dual: bool | None = None, seed: int = 0) -> dict:
    """Aggregate decode tok/s: two, then four requests decoding together, over one alone."""
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

    def together(n: int) -> float:
        """Prompts are prefilled one after another, so each request of a group decodes longer
        (tokens x (2n - 1)): the first must still run when the last starts."""
        group = [_Timer() for _ in range(n)]
        for t in group:
            engine.submit(ids(8), tokens * (2 * n - 1), SamplingParams(), t)
        for t in group:
            t.done.wait()
        return decode_rate(group)

    try:
        r1, r2, r4 = together(1), together(2), together(4)
    finally:
        engine.shutdown(1)
    return {
        "op": "dual_batch",
        "overlap": engine.scheduler.dual_batch,
        "tok_s_one": r1,
        "tok_s_two": r2,
        "ratio": r2 / r1,
        "limit": 1.5,
        "tok_s_four": r4,
        "ratio_four": r4 / r1,
    }
