"""`refmoe serve` against clients that misbehave, and its shutdown, with real clients (httpx)
and a real process: random disconnects never touch the other requests, SIGTERM drains and
ends every stream with an error event and [DONE] before any connection closes, oversized
bodies get 413 before they are read, text that cannot fit is refused without tokenizing, a
model that fails to load makes the server exit non-zero, log probabilities are refused by
name."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_server import CONTEXT, Server, _metric, _port
from test_tokenizer import chat_model  # noqa: F401 (fixture)

from refmoe import models
from refmoe.generate import generate
from refmoe.sampling import SamplingParams

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def loaded(chat_model):  # noqa: F811
    return models.load(chat_model)[1]


def _slow(model, seconds: float):
    """The model with every decode step slowed (so that clients can hang up mid-request)."""
    real = model.forward_batch

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    model.forward_batch = slow
    return real


def _stream_lines(url, body, stop_after=None, timeout=60):
    lines = []
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout
    ) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if stop_after is not None and len(lines) >= stop_after:
                break  # hang up
    return lines


def _ids(lines):
    return (
        [
            t
            for ln in lines
            if ln.startswith("data: {")
            for t in json.loads(ln[6:])["choices"][0].get("token_ids", [])
        ]
        if lines
        else []
    )


def test_random_http_disconnects_never_touch_survivors(chat_model, loaded):  # noqa: F811
    rng = random.Random(3)
    real = _slow(loaded, 0.01)
    try:
        prompts = {i: [4 + i % 5, 5 + i // 5] for i in range(6)}
        want = {i: generate(loaded, p, 30, SamplingParams()).token_ids for i, p in prompts.items()}
        s = Server(
            chat_model, model=loaded, engine_kwargs={"max_context": CONTEXT, "max_batch": 32}
        )
        s.wait_ready()
        got, errors = {}, []

        def survivor(i):
            body = {"prompt": prompts[i], "max_tokens": 30, "temperature": 0}
            try:
                if i % 2:
                    lines = _stream_lines(s.url, body)
                    assert lines[-1] == "data: [DONE]", lines[-3:]
                    got[i] = _ids(lines)
                else:
                    r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
                    assert r.status_code == 200, r.text
                    got[i] = r.json()["choices"][0]["token_ids"]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"survivor {i}: {e!r}")

        def doomed(j):
            body = {"prompt": [4 + j % 5, 6], "max_tokens": 80, "temperature": 0.8, "seed": j}
            try:
                if j % 2:
                    _stream_lines(s.url, body, stop_after=rng.randint(1, 12))
                else:
                    httpx.post(s.url + "/v1/completions", json=body, timeout=rng.uniform(0.02, 0.4))
            except httpx.TimeoutException:
                pass  # the client gave up: a disconnect

        threads = [threading.Thread(target=survivor, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=doomed, args=(j,)) for j in range(30)]
        rng.shuffle(threads)
        for t in threads:
            t.start()
            time.sleep(rng.uniform(0, 0.02))
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert got == want
        deadline = time.monotonic() + 30
        while (
            _metric(s.url, "refmoe_kv_cache_usage_ratio"),
            _metric(s.url, "refmoe_num_requests_running"),
            _metric(s.url, "refmoe_num_requests_waiting"),
        ) != (0, 0, 0):
            assert time.monotonic() < deadline, "KV or gauges never came back to zero"
            time.sleep(0.05)
        s.stop()
    finally:
        loaded.forward_batch = real


def test_shutdown_ends_streams_with_an_error_event_and_done(chat_model, loaded):  # noqa: F811
    real = _slow(loaded, 0.05)
    try:
        s = Server(chat_model, model=loaded, drain_s=0.3, engine_kwargs={"max_context": CONTEXT})
        s.wait_ready()
        out = {}

        def streamed():
            out["stream"] = _stream_lines(s.url, {"prompt": [4], "max_tokens": 90})

        def plain():
            out["plain"] = httpx.post(
                s.url + "/v1/completions", timeout=60, json={"prompt": [5], "max_tokens": 90}
            )

        threads = [threading.Thread(target=streamed), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        s.stop()
        for t in threads:
            t.join(30)
        lines = out["stream"]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert err["code"] == 503 and "shut down" in err["message"] and err["type"]
        assert out["plain"].status_code == 503
        assert "shut down" in out["plain"].json()["error"]["message"]
        assert time.monotonic() - t0 < 10
    finally:
        loaded.forward_batch = real


def _serve(model_dir, *extra):
    port = _port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refmoe.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, f"http://127.0.0.1:{port}"


def test_sigterm_drains_then_exits_zero(chat_model):  # noqa: F811
    proc, url = _serve(chat_model, "--drain-s", "2")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)
        lines = []

        def streamed():
            lines.extend(_stream_lines(url, {"prompt": [4], "max_tokens": 90}))

        t = threading.Thread(target=streamed)
        t.start()
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert lines and lines[-1] == "data: [DONE]"  # finished, or told why
        assert proc.wait(30) == 0
        log = proc.stderr.read()
        assert "Traceback" not in log and "draining" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_model_that_fails_to_load_exits_non_zero(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    proc, _ = _serve(tmp_path)
    assert proc.wait(60) == 1
    log = proc.stderr.read()
    assert "ERROR" in log and "failed to load" in log and "config.json" in log, log


def test_oversized_bodies_and_texts(chat_model):  # noqa: F811
    s = Server(chat_model, max_body_mb=0.01, engine_kwargs={"max_context": CONTEXT})
    try:
        s.wait_ready()
        big = json.dumps({"prompt": "hello " * 4000})
        r = httpx.post(
            s.url + "/v1/completions", content=big, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(100):
                yield b" " * 1000

        r = httpx.post(
            s.url + "/v1/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        # under the cap but beyond what the context can hold: refused before tokenizing
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hello " * 1500})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "prompt"
        assert time.monotonic() - t0 < 5
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "cat " * 2000}]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_bad_logprobs_refused_by_name(server_default):
    url = server_default.url
    chat = {"messages": [{"role": "user", "content": "hello cat"}], "max_tokens": 2}
    for extra, field in (
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ):
        r = httpx.post(url + "/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "logprobs": False})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


@pytest.fixture(scope="module")
def server_default(chat_model):  # noqa: F811
    s = Server(chat_model, engine_kwargs={"max_context": CONTEXT})
    s.wait_ready()
    yield s
    s.stop()
