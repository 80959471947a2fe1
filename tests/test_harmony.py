"""gpt-oss's harmony format (refmoe/harmony.py): channels read off a reply, as a stream or
whole (analysis: reasoning, final: content, commentary to functions.NAME: a tool call), and end
to end through the server on a scripted model whose harmony markers are special tokens (kept
in decoded text: refmoe.tokenizer.markup) and whose <|call|> ends the reply through
generation_config.json (config.json names only <|return|>)."""

import json

import pytest
from conftest import write_scripted_model
from test_server import Server

from refmoe import harmony
from refmoe.config import ModelConfig
from refmoe.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
transformers = pytest.importorskip("transformers")

REPLY = (
    "<|channel|>analysis<|message|>User asks weather. Call the tool.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)


def test_parse_channels():
    thought, content, calls = harmony.parse(REPLY)
    assert thought == "User asks weather. Call the tool." and content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    answer = (
        "<|channel|>analysis<|message|>easy<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|return|>"
    )
    assert harmony.parse(answer)[:2] == ("easy", "4")
    # the recipient may come before the channel
    early = (
        "<|channel|>analysis<|message|>x<|end|>"
        "<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>"
    )
    assert [c.name for c in harmony.parse(early)[2]] == ["f"]
    assert harmony.is_harmony("<|start|>{{ role }}<|channel|>final<|message|>")
    assert not harmony.is_harmony("<think></think>") and not harmony.is_harmony(None)


def test_stream_agrees_with_the_whole_at_every_split():
    want = harmony.parse(REPLY)
    for cut in range(len(REPLY) + 1):
        s = harmony.HarmonyStream()
        a = s.feed(REPLY[:cut])
        b = s.feed(REPLY, final=True)
        assert a[0] + b[0] == want[0] and a[1] + b[1] == want[1]
        assert [c.name for c in a[2] + b[2]] == ["get_weather"]
        # nothing of a marker leaks out while it is being written
        assert "<|" not in a[0] + a[1]


def test_an_unfinished_call_counts_only_at_the_end():
    cut = REPLY[: REPLY.index("<|call|>")]
    assert harmony.parse(cut, final=False)[2] == []
    assert [c.name for c in harmony.parse(cut, final=True)[2]] == ["get_weather"]


# -- end to end -------------------------------------------------------------------------------

WORDS = [
    "<|startoftext|>",
    "<|return|>",
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|call|>",
    "<|constrain|>",
    "assistant",
    "user",
    "commentary",
    "to=functions.get_weather",
    "json",
    '{"city":',
    '"Paris"}',
    "weather",
    "in",
    "Paris",
    "ok",
]
W = {w: i for i, w in enumerate(WORDS)}
CHAIN = [  # after the generation prompt "<|start|> assistant": a call in the commentary channel
    "assistant",
    "<|channel|>",
    "commentary",
    "to=functions.get_weather",
    "<|constrain|>",
    "json",
    "<|message|>",
    '{"city":',
    '"Paris"}',
    "<|call|>",
]
TEMPLATE = (
    "{% for m in messages %}<|start|> {{ m['role'] }} <|message|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if tools %}<|start|> tools <|channel|> commentary <|message|> "
    "{% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|end|> {% endif %}"
    "{% if add_generation_prompt %}<|start|> assistant{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "weather in Paris"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("harmony")
    write_scripted_model(d, WORDS, CHAIN, TEMPLATE, eos="<|return|>", specials=8)
    # as gpt-oss ships: <|call|> ends a reply by generation_config.json alone
    (d / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [W["<|return|>"], W["<|call|>"]]})
    )
    return d


def test_markers_survive_decoding_and_call_ends_the_reply(model_dir):
    cfg = ModelConfig.from_file(model_dir)
    assert cfg.eos_token_id == [W["<|return|>"], W["<|call|>"]]
    tok = Tokenizer.from_dir(model_dir)
    ids = [W[w] for w in ("<|startoftext|>", "<|channel|>", "commentary", "<|call|>", "<|return|>")]
    text = tok.decode(ids)  # control tokens dropped, markup kept
    assert "<|channel|>" in text and "<|call|>" in text
    assert "<|startoftext|>" not in text and "<|return|>" not in text
    bad = model_dir / "bad"
    bad.mkdir()
    for f in ("config.json",):
        (bad / f).write_text((model_dir / f).read_text())
    (bad / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="generation_config.json: field 'eos_token_id'"):
        ModelConfig.from_file(bad)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, engine_kwargs={"max_context": 256})
    s.wait_ready()
    yield s
    s.stop()


def test_openai_and_anthropic_read_harmony_calls(server):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=30
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    names, content = [], ""
    for chunk in oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=30, stream=True
    ):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            names += [tc.function.name for tc in ch.delta.tool_calls or []]
    assert names == ["get_weather"] and "<|" not in content
    c = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    m = c.messages.create(
        model="tiny", max_tokens=30, messages=ASK, tools=[tool], extra_body={"temperature": 0}
    )
    assert m.stop_reason == "tool_use"
    assert [b.input for b in m.content if b.type == "tool_use"] == [{"city": "Paris"}]


def test_named_and_required_tool_choice(server):
    """tool_choice naming a tool (or required) starts the reply inside a commentary header to
    it; the reader reads the call with that header."""
    assert harmony.opening("f").startswith("<|channel|>commentary to=functions.f")
    s = harmony.HarmonyStream(harmony.opening("f"))
    assert [c.name for c in s.feed('{"a": 1}<|call|>', final=True)[2]] == ["f"]
    s = harmony.HarmonyStream(harmony.opening())
    assert [c.name for c in s.feed("g <|constrain|>json<|message|>{}", final=True)[2]] == ["g"]
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = oa.chat.completions.create(  # (the scripted vocabulary has no word for "required"'s
        model="tiny",  # opening, which ends mid-name; a named one it has)
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=30,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
