"""Reasoning and the families' tool-call formats: <think> blocks read off a reply (as a
stream or whole) and surfaced as OpenAI's reasoning_content and Anthropic's thinking blocks;
GLM-4.5's, MiniMax-M2's and Kimi-K2's tool-call formats; end to end through the real server
and the openai / anthropic clients on a scripted model whose template opens the thinking block
itself (the reply starts inside it) and teaches GLM's tool calls."""

import json

import pytest
from conftest import write_scripted_model
from test_server import Server

from refmoe import reasoning
from refmoe.tool_calls import ToolCallError, ToolStream, format_of, opening

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
transformers = pytest.importorskip("transformers")


# -- reasoning ------------------------------------------------------------------------------


def test_stream_holds_back_a_partial_marker():
    r = reasoning.ReasoningStream()
    assert r.feed("  <th") == ("", "")  # may become <think>
    assert r.feed("  <think>\nweigh it</th") == ("\nweigh it", "")  # "</th" held back
    assert r.feed("  <think>\nweigh it</think>\n\nAnswer") == ("", "Answer")
    assert r.feed("  <think>\nweigh it</think>\n\nAnswer <think> no", final=True) == (
        "",
        " <think> no",  # after the reasoning, a <think> is content
    )


def test_split_inside_outside_and_cut():
    assert reasoning.split("plain answer") == ("", "plain answer")
    assert reasoning.split("weigh</think>\nyes", inside=True) == ("weigh", "yes")
    assert reasoning.split("<think>cut by max_tokens") == ("cut by max_tokens", "")
    assert reasoning.split("<thinking is a word", inside=False) == ("", "<thinking is a word")
    assert reasoning.starts_inside("<|Assistant|><think>\n")
    assert not reasoning.starts_inside("<|Assistant|><think>x</think>")
    assert reasoning.format_of("... </think> ...") == "think"
    assert reasoning.format_of("{{ messages }}") is None and reasoning.format_of(None) is None
    # every split of a reply streams to the same whole
    text = "<think>a</think>b</think>c"
    for cut in range(len(text) + 1):
        r = reasoning.ReasoningStream()
        first, last = r.feed(text[:cut]), r.feed(text, final=True)
        assert (first[0] + last[0], first[1] + last[1]) == ("a", "b</think>c")


# -- the families' tool-call formats --------------------------------------------------------


def test_glm_calls():
    assert format_of("<tool_call>{{ name }}<arg_key>k</arg_key>") == "glm"
    assert format_of("<tool_call>{json}</tool_call>") == "hermes"
    ts = ToolStream("glm")
    text = (
        "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>"
        "\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    )
    content, calls = ts.feed(text[:20])
    assert content == "Checking." and calls == []
    content, calls = ts.feed(text, final=True)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3})
    ]
    assert opening("glm", "get_weather") == "<tool_call>get_weather\n"
    with pytest.raises(ToolCallError, match="no name"):
        ToolStream("glm").feed("<tool_call><arg_key>a</arg_key></tool_call>", final=True)


def test_minimax_calls():
    assert format_of("<minimax:tool_call><invoke name=") == "minimax"
    text = (
        'ok<minimax:tool_call>\n<invoke name="a">\n<parameter name="x">[1, 2]</parameter>\n'
        '</invoke>\n<invoke name="b">\n<parameter name="y">hi there</parameter>\n</invoke>\n'
        "</minimax:tool_call>"
    )
    content, calls = ToolStream("minimax").feed(text, final=True)
    assert content == "ok"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("a", {"x": [1, 2]}),
        ("b", {"y": "hi there"}),
    ]
    with pytest.raises(ToolCallError, match="no <invoke>"):
        ToolStream("minimax").feed("<minimax:tool_call>x</minimax:tool_call>", final=True)


def test_kimi_calls():
    assert format_of("<|tool_calls_section_begin|><|tool_call_begin|>") == "kimi"
    text = (
        "x<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.now:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|>"
    )
    ts = ToolStream("kimi")
    assert ts.feed(text[:5]) == ("x", [])  # a partial section marker is held back
    content, calls = ts.feed(text, final=True)
    assert content == "" and [c.name for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert opening("kimi", "now").endswith("functions.now:0<|tool_call_argument_begin|>")
    with pytest.raises(ToolCallError, match="not JSON"):
        ToolStream("kimi").feed(
            "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{x<|tool_call_end|>",
            final=True,
        )


# -- end to end: a thinking model that calls a tool in GLM's format --------------------------

WORDS = [
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<think>",
    "</think>",
    "hmm",
    "rain",
    "<tool_call>",
    "get_weather",
    "<arg_key>",
    "city",
    "</arg_key>",
    "<arg_value>",
    "Paris",
    "</arg_value>",
    "</tool_call>",
    "weather",
    "in",
    "ok",
]
W = {w: i for i, w in enumerate(WORDS)}
# greedy decoding after the generation prompt (which opens <think>): reasoning, then a call
CHAIN = [
    "<think>",
    "hmm",
    "rain",
    "</think>",
    "<tool_call>",
    "get_weather",
    "<arg_key>",
    "city",
    "</arg_key>",
    "<arg_value>",
    "Paris",
    "</arg_value>",
    "</tool_call>",
    "</s>",
]
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|user|> tools: {% for t in tools %}"
    "{{ t['function']['name'] }} {% endfor %}<tool_call> <arg_key> </arg_key> {% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> <think> </think> {{ m['content'] or '' }} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> <think>{% endif %}"
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
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("thinking")
    write_scripted_model(d, WORDS, CHAIN, TEMPLATE, eos="</s>", specials=4, bos="<s>")
    s = Server(d, engine_kwargs={"max_context": 256})
    s.wait_ready()
    yield s
    s.stop()


def test_openai_reasoning_and_glm_call(server):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=20
    )
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "hmm rain"
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: the reasoning as reasoning_content deltas, never as content
    thought, content, calls = "", "", []
    for chunk in oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=20, stream=True
    ):
        for ch in chunk.choices:
            thought += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            content += ch.delta.content or ""
            calls += [tc.function.name for tc in ch.delta.tool_calls or []]
    assert thought.strip() == "hmm rain" and content.strip() == "" and calls == ["get_weather"]
    # without tools the call is content, the reasoning still apart
    r = oa.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=4)
    assert r.choices[0].message.model_extra["reasoning_content"] == "hmm rain"
    assert r.choices[0].message.content.startswith("<tool_call>")


def test_anthropic_thinking_blocks(server):
    c = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    tool = {
        "name": "get_weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    m = c.messages.create(
        model="tiny", max_tokens=20, messages=ASK, tools=[tool], extra_body={"temperature": 0}
    )
    assert [b.type for b in m.content] == ["thinking", "tool_use"]
    assert m.content[0].thinking == "hmm rain" and m.content[1].input == {"city": "Paris"}
    with c.messages.stream(
        model="tiny", max_tokens=20, messages=ASK, tools=[tool], extra_body={"temperature": 0}
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content][0] == "thinking"
    assert final.content[0].thinking.strip() == "hmm rain"
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"city": "Paris"}]
    assert final.stop_reason == "tool_use"
