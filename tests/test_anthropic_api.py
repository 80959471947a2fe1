"""Anthropic's Messages API (/v1/messages) on the same engine, driven by the anthropic Python
client: the text a greedy request gets equals the OpenAI chat endpoint's, streamed or not;
stop reasons (max_tokens, stop_sequence); usage; errors in Anthropic's shape; x-api-key."""

import httpx
import pytest
from test_server import CONTEXT, Server
from test_tokenizer import chat_model  # noqa: F401 (fixture)

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

HELLO = [{"role": "user", "content": "hello cat"}]


@pytest.fixture(scope="module")
def server(chat_model):  # noqa: F811
    s = Server(chat_model, api_key="sekret", engine_kwargs={"max_context": CONTEXT})
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="sekret", max_retries=0)


def _openai_text(server, n):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
    r = c.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=n, extra_body={"temperature": 0}
    )
    return r.choices[0].message.content, r.usage


def test_messages_match_the_chat_endpoint(server, client):
    want, usage = _openai_text(server, 6)
    m = client.messages.create(
        model="tiny", max_tokens=6, messages=HELLO, extra_body={"temperature": 0}
    )
    assert m.type == "message" and m.role == "assistant" and m.model == "tiny"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == want
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.input_tokens == usage.prompt_tokens and m.usage.output_tokens == 6
    # content as a list of text blocks is the same conversation
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hello cat"}]}]
    again = client.messages.create(
        model="tiny", max_tokens=6, messages=blocks, extra_body={"temperature": 0}
    )
    assert again.content[0].text == want


def test_streamed_messages(server, client):
    want, _ = _openai_text(server, 6)
    with client.messages.stream(
        model="tiny", max_tokens=6, messages=HELLO, extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == want == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6
    raw = httpx.post(
        server.url + "/v1/messages",
        headers={"x-api-key": "sekret"},
        json={"model": "tiny", "max_tokens": 3, "messages": HELLO, "stream": True},
    ).text
    kinds = [ln[7:] for ln in raw.splitlines() if ln.startswith("event: ")]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_stop_sequence(server, client):
    free = client.messages.create(
        model="tiny", max_tokens=12, messages=HELLO, extra_body={"temperature": 0}
    )
    words = free.content[0].text.split()
    assert words, f"the tiny model said nothing to stop on: {free.content[0].text!r}"
    m = client.messages.create(
        model="tiny",
        max_tokens=12,
        messages=HELLO,
        extra_body={"temperature": 0},
        stop_sequences=[words[-1]],
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == words[-1]
    assert words[-1] not in m.content[0].text


def test_errors_in_anthropics_shape(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=4, messages=HELLO, system="be brief")
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "only user turns" in e.value.body["error"]["message"]  # this model's template
    r = httpx.post(
        server.url + "/v1/messages",
        headers={"x-api-key": "sekret"},
        json={"model": "tiny", "messages": HELLO},
    )  # max_tokens is required
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        server.url + "/v1/messages",
        headers={"x-api-key": "wrong"},
        json={"model": "tiny", "max_tokens": 2, "messages": HELLO},
    )
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        server.url + "/v1/messages",
        headers={"x-api-key": "sekret"},
        json={
            "model": "tiny",
            "max_tokens": 2,
            "messages": HELLO,
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        },
    )
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=2, messages=HELLO)


def test_a_cached_prefix_is_reported_by_both_apis(server, client):
    """The same long conversation twice: the second prefills only what the prefix cache lacks,
    and says so: OpenAI's usage.prompt_tokens_details.cached_tokens, Anthropic's
    cache_read_input_tokens (its input_tokens then count only the tokens prefilled)."""
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
    ids = [4 + i % 5 for i in range(40)]
    first = oa.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    again = oa.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32  # one full 32-token block
    assert again.choices[0].text == first.choices[0].text
    talk = [{"role": "user", "content": " ".join(["hello cat"] * 20)}]
    m1 = client.messages.create(
        model="tiny", max_tokens=4, messages=talk, extra_body={"temperature": 0}
    )
    m2 = client.messages.create(
        model="tiny", max_tokens=4, messages=talk, extra_body={"temperature": 0}
    )
    assert m1.usage.cache_read_input_tokens == 0 and m2.usage.cache_read_input_tokens == 32
    assert m2.usage.input_tokens + 32 == m1.usage.input_tokens
    assert m2.content[0].text == m1.content[0].text
