"""`refmoe serve` as clients see it: a real uvicorn server on a loopback port, driven by the
openai package and httpx: completions and chat, streaming and not, 32 concurrent clients,
cancellation mid-stream (KV back to zero), every kind of bad request, 429, the API key,
/health while loading, shutdown, and a schemathesis fuzz run of the server's own schema."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hypothesis
import pytest
from test_tokenizer import WORDS, chat_model  # noqa: F401 (fixture)

from refmoe import models
from refmoe.generate import generate
from refmoe.sampling import SamplingParams
from refmoe.server import Server as DrainingServer
from refmoe.server import create_app

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

CONTEXT = 96


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app(...) served by uvicorn in a thread, until stop()."""

    def __init__(self, model_dir, **kwargs):
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(model_dir, served_name="tiny", **kwargs)
        self.server = DrainingServer(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def wait_ready(self, timeout=60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "server did not shut down"


def serving(model_dir, max_context: int = 256):
    """A module fixture's body: a ready Server on model_dir (engine context max_context),
    yielded, then stopped."""
    s = Server(model_dir, engine_kwargs={"max_context": max_context})
    s.wait_ready()
    yield s
    s.stop()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def server(chat_model):  # noqa: F811
    s = Server(chat_model, engine_kwargs={"max_context": CONTEXT, "max_batch": 8})
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(chat_model):  # noqa: F811
    """Greedy continuations computed directly, without the server."""
    _, model = models.load(chat_model)

    def run(ids, n):
        return generate(model, ids, n, SamplingParams()).token_ids

    return run


def test_completion_with_token_ids_matches_generate(client, reference):
    r = client.completions.create(model="tiny", prompt=[4, 5, 6], max_tokens=10, temperature=0)
    want = reference([4, 5, 6], 10)
    assert r.model == "tiny" and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 10
    assert r.usage.total_tokens == 13
    words = [WORDS[t] for t in want]
    assert r.choices[0].text.split() == [w for w in words if w not in WORDS[:4]]


def test_text_prompt_and_chat(client, reference):
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == 2
    c = client.chat.completions.create(
        model="tiny",
        temperature=0,
        max_tokens=6,
        messages=[{"role": "user", "content": "hello cat"}],
    )
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.usage.prompt_tokens == 5 and c.usage.completion_tokens == 6
    want = reference([0, 2, 4, 7, 3], 6)
    assert c.choices[0].message.content.split() == [
        WORDS[t] for t in want if WORDS[t] not in WORDS[:4]
    ]


def test_streaming_with_usage(client, reference):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            temperature=0,
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "the cat"}],
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    whole = client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=7, messages=[{"role": "user", "content": "the cat"}]
    )
    assert text == whole.choices[0].message.content
    # completions stream, raw SSE: data lines ending in [DONE]
    with httpx.stream(
        "POST",
        client.base_url.join("completions").__str__(),
        json={"prompt": [4, 5], "max_tokens": 3, "temperature": 0, "stream": True},
    ) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    assert [json.loads(ln[6:])["choices"][0]["finish_reason"] for ln in lines[:-1]][-1] == "length"


def test_32_concurrent_clients(client, reference):
    prompts = [[4 + i % 5, 5 + i % 3, 6] for i in range(32)]

    def one(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, prompts))
    for p, r in zip(prompts, results):
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        assert r.choices[0].model_extra["token_ids"] == reference(p, 12)


def test_cancel_mid_stream_frees_kv(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": [4, 5], "max_tokens": 90, "temperature": 0.7, "seed": 1, "stream": True},
    ) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 4:
                break  # the client hangs up here
    deadline = time.monotonic() + 20
    while (
        _metric(server.url, "refmoe_kv_cache_usage_ratio") != 0
        or _metric(server.url, "refmoe_num_requests_running") != 0
    ):
        assert time.monotonic() < deadline, "KV not freed after the client went away"
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ("{not json", 400, "JSON"),
        ({"prompt": [4], "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": list(range(4, 9)) * 20, "max_tokens": 4}, 400, "context"),
        ({"prompt": [4], "max_tokens": 1000}, 400, "context"),
        ({"prompt": [4], "temperature": -1}, 400, "temperature"),
        ({"prompt": [4], "temperature": 1e9}, 400, "temperature"),
        ({"prompt": [4], "top_p": 0}, 400, "top_p"),
        ({"prompt": [4], "n": 3}, 400, "n"),
        ({"prompt": [4], "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": [4, 999]}, 400, "token ids"),
        ({"prompt": [-1], "echo": True}, 400, "token ids"),  # found by the schema fuzz
        ({"prompt": [4, 999], "echo": True, "logprobs": 1}, 400, "token ids"),
        ({"prompt": []}, 400, "empty"),
        ({"prompt": ""}, 400, "empty"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": [4], "model": "gpt-4"}, 404, "does not exist"),
        ({"prompt": [4], "logprobs": 21}, 400, "logprobs"),
        ({"prompt": "hello \ud800"}, 400, "not valid Unicode"),
        ({"prompt": [4], "stop": ["x"] * 17}, 400, "stop"),
        ({"prompt": [4], "stop": "x" * 257}, 400, "stop"),
        ({"prompt": [4], "logprobs": -3}, 400, "logprobs"),
        ({"prompt": [4], "seed": -(2**63) - 1}, 400, "seed"),  # found by the schema fuzz
        ({"prompt": [4], "seed": 2**64}, 400, "seed"),
    ],
)
def test_bad_completion_requests(server, body, status, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        server.url + "/v1/completions", content=data, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_bad_chat_and_tokenize_requests(server):
    post = lambda path, body: httpx.post(server.url + path, json=body)  # noqa: E731
    assert post("/v1/chat/completions", {"messages": []}).status_code == 400
    assert (
        post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}).status_code
        == 400
    )
    r = post("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and "only user turns" in r.json()["error"]["message"]
    assert post("/detokenize", {"tokens": [1, 99]}).status_code == 400
    assert post("/tokenize", {}).status_code == 400
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": [image]}]})
    assert r.status_code == 400 and "messages.0.content" in r.json()["error"]["message"]


def test_chat_content_as_text_parts(server):
    """Content as OpenAI's list of parts (what agents and SDKs send): text parts joined."""
    plain = {
        "messages": [{"role": "user", "content": "hello cat"}],
        "max_tokens": 3,
        "temperature": 0,
    }
    parts = {
        **plain,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "cat"}],
            }
        ],
    }
    a = httpx.post(server.url + "/v1/chat/completions", json=plain).json()
    b = httpx.post(server.url + "/v1/chat/completions", json=parts).json()
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["usage"] == b["usage"]


def test_tokenize_models_metrics(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == [4, 5] and r["count"] == 2 and r["max_model_len"] == CONTEXT
    chat = httpx.post(
        server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hello cat"}]}
    ).json()
    assert chat["tokens"] == [0, 2, 4, 7, 3]
    assert httpx.post(server.url + "/detokenize", json={"tokens": [6, 7, 8]}).json() == {
        "prompt": "the cat sat"
    }
    models_ = httpx.get(server.url + "/v1/models").json()
    assert models_["data"][0]["id"] == "tiny"
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "refmoe_time_to_first_token_seconds_bucket",
        "refmoe_inter_token_latency_seconds_count",
        "refmoe_e2e_request_latency_seconds_sum",
        "refmoe_num_requests_waiting",
        "refmoe_kv_cache_usage_ratio",
        "refmoe_prompt_tokens_total",
        "refmoe_generation_tokens_total",
        "refmoe_cpu_expert_seconds_total",
    ):
        assert any(
            line.startswith(name + "{") and 'model="tiny"' in line for line in text.splitlines()
        ), name
    assert _metric(server.url, "refmoe_generation_tokens_total") > 0
    assert _metric(server.url, "refmoe_cpu_expert_seconds_total") > 0


def _slow_prefill(monkeypatch, gate: threading.Event):
    """Hold every prefill until the gate opens: on the prefill worker, and on the decode
    worker, where CPU prompts run in chunks (chunked prefill)."""
    from refmoe import engine

    for name in ("_prefill", "_decode"):
        real = getattr(engine.Engine, name)

        def slow(self, plan, real=real):
            gate.wait(30)
            return real(self, plan)

        monkeypatch.setattr(engine.Engine, name, slow)


def test_full_queue_answers_429(chat_model, monkeypatch):  # noqa: F811
    gate = threading.Event()
    _slow_prefill(monkeypatch, gate)
    s = Server(chat_model, engine_kwargs={"max_queue": 1, "max_context": CONTEXT})
    try:
        s.wait_ready()
        body = {"prompt": [4], "max_tokens": 2}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60)
            time.sleep(0.5)  # taken by the (held) prefill worker
            second = pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60)
            time.sleep(0.5)  # waiting in the queue: the bound is reached
            third = httpx.post(s.url + "/v1/completions", json=body)
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        gate.set()
        s.stop()


def test_health_while_loading_and_api_key(chat_model, monkeypatch):  # noqa: F811
    gate = threading.Event()
    real = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: (gate.wait(30), real(*a, **k))[1])
    s = Server(chat_model, api_key="sekret", engine_kwargs={"max_context": CONTEXT})
    try:
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(
            s.url + "/v1/completions",
            json={"prompt": [4]},
            headers={"authorization": "Bearer sekret"},
        )
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        s.wait_ready()
        assert httpx.post(s.url + "/v1/completions", json={"prompt": [4]}).status_code == 401
        assert (
            httpx.post(
                s.url + "/v1/completions",
                json={"prompt": [4]},
                headers={"authorization": "Bearer wrong"},
            ).status_code
            == 401
        )
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt=[4], max_tokens=2).usage
    finally:
        gate.set()
        s.stop()


def test_shutdown_drains_or_fails_explicitly(chat_model):  # noqa: F811
    s = Server(chat_model, drain_s=0.5, engine_kwargs={"max_context": CONTEXT})
    s.wait_ready()
    got = []

    def long_stream():
        with httpx.stream(
            "POST",
            s.url + "/v1/completions",
            timeout=60,
            json={"prompt": [4], "max_tokens": 90, "stream": True},
        ) as resp:
            got.extend(ln for ln in resp.iter_lines() if ln)

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.3)
    s.stop()
    t.join(timeout=30)
    assert not t.is_alive(), "a client hung across shutdown"
    assert got and (got[-1] == "data: [DONE]")  # finished or told why, then closed


schemathesis = pytest.importorskip("schemathesis")
SCHEMA = schemathesis.openapi.from_dict(create_app("/nonexistent", served_name="tiny").openapi())


@SCHEMA.parametrize()
@hypothesis.settings(
    max_examples=15, deadline=None, suppress_health_check=list(hypothesis.HealthCheck)
)
def test_fuzz_schema_no_5xx(case, server):
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code < 500, (case.path, response.text)
    assert httpx.get(server.url + "/health").status_code == 200
