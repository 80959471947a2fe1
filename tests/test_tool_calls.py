"""Tool calls: the formats read off model output (refmoe/tool_calls.py), and the OpenAI and
Anthropic APIs end to end with their own clients, on a scripted model: a one-layer Qwen3-MoE
whose layer adds nothing and whose lm_head maps each token to its successor in a fixed chain,
so that greedy decoding after the generation prompt writes a tool call in the Hermes format,
through real safetensors, a real tokenizer and chat template, and the real engine."""

import json

import pytest
from conftest import write_scripted_model
from test_server import Server
from test_tokenizer import chat_model  # noqa: F401 (fixture)

from refmoe.tool_calls import ToolCallError, ToolStream, format_of, opening

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
transformers = pytest.importorskip("transformers")

WORDS = [
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<tool_call>",
    "</tool_call>",
    '{"name":',
    '"get_weather",',
    '"arguments":',
    '{"city":',
    '"Paris"}}',
    "weather",
    "in",
    "Paris",
    "result",
    "ok",
]
W = {w: i for i, w in enumerate(WORDS)}
# what greedy decoding writes after each token: the generation prompt starts a tool call
CHAIN = [
    "<|assistant|>",
    "<tool_call>",
    '{"name":',
    '"get_weather",',
    '"arguments":',
    '{"city":',
    '"Paris"}}',
    "</tool_call>",
    "</s>",
]
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|user|> tools: {% for t in tools %}"
    "{{ t['function']['name'] }} {% endfor %}<tool_call> </tool_call> {% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' or m['role'] == 'system' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] or '' }} "
    "{% for c in m['tool_calls'] or [] %}<tool_call> {{ c['function']['name'] }} </tool_call> "
    "{% endfor %}"
    "{% elif m['role'] == 'tool' %}<|user|> result {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripted")
    write_scripted_model(d, WORDS, CHAIN, TEMPLATE, eos="</s>", specials=4, bos="<s>")
    return d


@pytest.fixture(scope="module")
def server(scripted):
    s = Server(scripted, engine_kwargs={"max_context": 256})
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


ASK = [{"role": "user", "content": "weather in Paris"}]


# -- the formats --------------------------------------------------------------------------


def test_hermes_stream_holds_back_markers_and_reads_calls():
    ts = ToolStream("hermes")
    assert ts.feed("Let me check <tool") == ("Let me check ", [])  # "<tool" may start a call
    text, calls = ts.feed('Let me check <tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert text == "" and calls == []  # the call has not ended
    text, calls = ts.feed(
        'Let me check <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> done',
        final=True,
    )
    assert text == " done" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"x": 1})
    ]
    assert calls[0].id.startswith("call_") and calls[0].as_openai()["type"] == "function"
    with pytest.raises(ToolCallError, match="not JSON"):
        ToolStream("hermes").feed("<tool_call>{oops</tool_call>", final=True)
    with pytest.raises(ToolCallError, match="never ends"):
        ToolStream("hermes").feed('<tool_call>{"name": "f"', final=True)
    with pytest.raises(ToolCallError, match="'f': its arguments are not a JSON object"):
        ToolStream("hermes").feed('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', True)


def test_deepseek_formats_and_openings():
    v31 = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Tokyo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    text, calls = ToolStream("deepseek").feed("Sure." + v31, final=True)
    assert text == "Sure." and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Tokyo"}
    v3 = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    _, calls = ToolStream("deepseek").feed(v3, final=True)
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert format_of("... <tool_call> ...") == "hermes" and format_of("plain {{ x }}") is None
    assert format_of("{{'<｜tool▁call▁begin｜>'}}") == "deepseek"
    start = opening("deepseek", "get_weather")
    _, calls = ToolStream("deepseek", start).feed('{"a": 2}<｜tool▁call▁end｜>', final=True)
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"a": 2}


# -- OpenAI ---------------------------------------------------------------------------------


def test_openai_tool_call(oa):
    r = oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=20
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_openai_streamed_tool_call(oa):
    stream = oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=20, stream=True
    )
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and content.strip() == ""
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_tool_choice_none_named_and_errors(oa, server):
    r = oa.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=20,
    )
    # no tools in play: the same words come back as text, unread
    assert r.choices[0].finish_reason == "stop" and "<tool_call>" in r.choices[0].message.content
    assert r.choices[0].message.tool_calls is None
    named = oa.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=20,
    )
    (call,) = named.choices[0].message.tool_calls  # the reply was made to start inside it
    assert call.function.name == "get_weather" and named.usage.prompt_tokens > r.usage.prompt_tokens
    for choice, needle in (
        ({"type": "function", "function": {"name": "nope"}}, "no tool named 'nope'"),
        ("sometimes", "tool_choice"),
    ):
        with pytest.raises(openai.BadRequestError, match=needle):
            oa.chat.completions.create(
                model="tiny", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=4
            )
    with pytest.raises(openai.BadRequestError, match="no tools are given"):
        oa.chat.completions.create(model="tiny", messages=ASK, tool_choice="required", max_tokens=4)


def test_a_conversation_with_tool_results(oa):
    talk = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    r = oa.chat.completions.create(
        model="tiny", messages=talk, tools=[WEATHER], temperature=0, max_tokens=20
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_tools_refused_where_the_template_has_no_format(chat_model):  # noqa: F811
    s = Server(chat_model, engine_kwargs={"max_context": 96})
    s.wait_ready()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no tool-call format"):
            c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello"}], tools=[WEATHER]
            )
    finally:
        s.stop()


# -- Anthropic ------------------------------------------------------------------------------

TOOL = {
    "name": "get_weather",
    "description": "the weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_anthropic_tool_use(server):
    c = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    m = c.messages.create(
        model="tiny",
        max_tokens=20,
        messages=ASK,
        tools=[TOOL],
        extra_body={"temperature": 0},
    )
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    assert use.id.startswith("toolu_")
    with c.messages.stream(
        model="tiny",
        max_tokens=20,
        messages=ASK,
        tools=[TOOL],
        extra_body={"temperature": 0},
    ) as stream:
        final = stream.get_final_message()
    (use2,) = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and use2.input == {"city": "Paris"}
    # the result goes back as a tool_result block; the conversation goes on
    back = c.messages.create(
        model="tiny",
        max_tokens=20,
        tools=[TOOL],
        messages=ASK
        + [
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "ok"}],
            },
        ],
        extra_body={"temperature": 0},
    )
    assert back.stop_reason == "tool_use"
    none = c.messages.create(
        model="tiny",
        max_tokens=20,
        messages=ASK,
        tools=[TOOL],
        tool_choice={"type": "none"},
        extra_body={"temperature": 0},
    )
    assert none.stop_reason == "end_turn" and none.content[0].type == "text"
