"""Tool calls written as text, and earlier calls handed back to templates.

Qwen3.5 / 3.6, Qwen3-Coder and Qwen3-Coder-Next write a call as <tool_call>, <function=NAME> and
one <parameter=KEY> per argument with its value on its own lines (refmoe/tool_calls.py,
"qwen3_coder"); GLM and MiniMax also write each value as bare text. Such a value is typed by the
request's own schema for the parameter: a string parameter keeps "007" as written, an integer
one reads 3. An agent sends the calls back in its next turn with their arguments as JSON text
(OpenAI's wire form), and those templates walk them as key-value pairs (`arguments|items`),
which fails on a string: the tokenizer hands templates the object, which still prints as the
text (refmoe.tokenizer.template_turns). End to end: a scripted model whose template has the
shape of Qwen3.5's released one, through the real server and the openai client, two turns."""

import json

import pytest
from conftest import write_scripted_model
from test_server import serving

from refmoe.tokenizer import Tokenizer, _template_env, template_turns
from refmoe.tool_calls import (
    ToolCallError,
    ToolStream,
    format_of,
    opening,
    schema_types,
    typed_value,
)

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string"},
                "days": {"type": "integer"},
            },
        },
    },
}
WRITE = {
    "type": "function",
    "function": {
        "name": "write_file",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"},
                "append": {"type": "boolean"},
                "mode": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}


# -- values typed by the schema ---------------------------------------------------------------


def test_typed_values_follow_the_schema():
    assert typed_value("007", {"type": "string"}) == "007"
    assert typed_value('{"a": 1}', {"type": "string"}) == '{"a": 1}'
    assert typed_value("true", {"type": "string"}) == "true"
    assert typed_value("42", {"type": "integer"}) == 42
    assert typed_value("42.0", {"type": "integer"}) == 42
    assert typed_value("1.5", {"type": "number"}) == 1.5
    assert typed_value("True", {"type": "boolean"}) is True
    assert typed_value("null", {"anyOf": [{"type": "integer"}, {"type": "null"}]}) is None
    assert typed_value("7", {"type": ["null", "integer"]}) == 7
    assert typed_value('["a", "b"]', {"type": "array"}) == ["a", "b"]
    assert typed_value('{"k": [1]}', {"type": "object"}) == {"k": [1]}
    # an integer parameter given text: the guess (the text), never an exception
    assert typed_value("soon", {"type": "integer"}) == "soon"
    # a string allowed beside a number: the number first, the text where it is none
    assert typed_value("12", {"type": ["string", "integer"]}) == 12
    assert typed_value("12a", {"type": ["string", "integer"]}) == "12a"
    # no schema: JSON where it reads, else the text
    assert typed_value("007") == "007" and typed_value("7") == 7 and typed_value("x y") == "x y"
    assert schema_types({"type": "object"}) == ["object"] and schema_types(None) == []


# -- the Qwen3-Coder / Qwen3.5 format ---------------------------------------------------------

QWEN_TEMPLATE_TOOLS = (
    "If you choose to call a function ONLY reply in the following format:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "</function>\n</tool_call>"
)


def test_qwen3_coder_format_is_told_apart():
    assert format_of(QWEN_TEMPLATE_TOOLS) == "qwen3_coder"
    assert format_of("<tool_call>\n{json}\n</tool_call>") == "hermes"
    # Llama 3.1's prompted format names <function= but writes no <tool_call>
    assert format_of("<function=example_function_name>{...}</function>") is None
    assert opening("qwen3_coder") == "<tool_call>\n"
    assert opening("qwen3_coder", "f") == "<tool_call>\n<function=f>\n"


QWEN_REPLY = (
    "I'll write it.\n\n<tool_call>\n<function=write_file>\n<parameter=path>\n/tmp/a.json\n"
    '</parameter>\n<parameter=content>\n{"name": "x",\n "n": 1}\n\n</parameter>\n'
    "<parameter=append>\nfalse\n</parameter>\n<parameter=mode>\nnull\n</parameter>\n"
    '<parameter=tags>\n["a"]\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n'
    "<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n<parameter=days>\n3\n"
    "</parameter>\n</function>\n</tool_call>"
)


def test_qwen3_coder_calls_typed_by_the_schema_at_every_cut():
    want = [
        (
            "write_file",
            {
                "path": "/tmp/a.json",
                # a string parameter holding JSON text stays that text, newlines and all
                "content": '{"name": "x",\n "n": 1}\n',
                "append": False,
                "mode": None,
                "tags": ["a"],
            },
        ),
        ("get_weather", {"city": "São Paulo", "days": 3}),
    ]
    for cut in range(len(QWEN_REPLY) + 1):
        ts = ToolStream("qwen3_coder", tools=[WRITE, WEATHER])
        first = ts.feed(QWEN_REPLY[:cut])
        last = ts.feed(QWEN_REPLY, final=True)
        content = first[0] + last[0]
        calls = first[1] + last[1]
        assert content.strip() == "I'll write it."
        assert [(c.name, json.loads(c.arguments)) for c in calls] == want
    # without the tools' schemas the values are guessed from their text
    _, calls = ToolStream("qwen3_coder").feed(QWEN_REPLY, final=True)
    assert json.loads(calls[0].arguments)["content"] == {"name": "x", "n": 1}


def test_qwen3_coder_unclosed_parameters_and_bad_blocks():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=zip>\n007\n"
    text += "</function>\n</tool_call>"
    _, calls = ToolStream("qwen3_coder", tools=[WEATHER]).feed(text, final=True)
    assert json.loads(calls[0].arguments) == {"city": "Paris", "zip": "007"}
    with pytest.raises(ToolCallError, match="no <function=NAME>"):
        ToolStream("qwen3_coder").feed('<tool_call>\n{"name": "f"}\n</tool_call>', final=True)


def test_glm_and_minimax_values_typed_by_the_schema():
    glm = (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>zip</arg_key>\n<arg_value>94110</arg_value>\n<arg_key>days</arg_key>\n"
        "<arg_value>3</arg_value>\n</tool_call>"
    )
    minimax = (
        '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris'
        '</parameter>\n<parameter name="zip">94110</parameter>\n<parameter name="days">3'
        "</parameter>\n</invoke>\n</minimax:tool_call>"
    )
    for fmt, text in (("glm", glm), ("minimax", minimax)):
        _, calls = ToolStream(fmt, tools=[WEATHER]).feed(text, final=True)
        assert json.loads(calls[0].arguments) == {"city": "Paris", "zip": "94110", "days": 3}
        _, calls = ToolStream(fmt).feed(text, final=True)  # no schema: the guess
        assert json.loads(calls[0].arguments)["zip"] == 94110


# -- earlier calls handed to templates --------------------------------------------------------

CALLED = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days":3}'},
        }
    ],
}


def test_templates_get_the_arguments_as_an_object_that_prints_as_its_text():
    env = _template_env()

    def render(source, turns=(CALLED,)):
        return env.from_string(source).render(messages=template_turns(list(turns)))

    loop = "{% for m in messages %}{% for c in m.tool_calls %}{% set f = c.function %}"
    end = "{% endfor %}{% endfor %}"
    assert render(
        loop + "{% for k, v in f.arguments|items %}{{ k }}={{ v }};{% endfor %}" + end
    ) == ("city=Paris;days=3;")
    # joined to strings or printed: the client's text exactly (DeepSeek-V3.1's template)
    assert render(loop + "{{ '<sep>' + f.arguments + '<end>' }}" + end) == (
        '<sep>{"city": "Paris", "days":3}<end>'
    )
    assert render(loop + "{{ f.arguments }}|{{ f.arguments.city }}" + end) == (
        '{"city": "Paris", "days":3}|Paris'
    )
    assert render(loop + "{{ f.arguments|tojson }} {{ f.arguments is mapping }}" + end) == (
        '{"city": "Paris", "days": 3} True'
    )
    assert CALLED["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris", "days":3}'
    # arguments that are no JSON object reach the template as given; a template that walks
    # them fails the request with a named error, not the server with a TypeError
    bad = {**CALLED, "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}
    assert render(loop + "{{ f.arguments }}" + end, [bad]) == "[1, 2]"


# -- end to end: a Qwen3.5-shaped template, two turns through the server -----------------------

WORDS = [
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<tool_call>\n<function=get_weather>\n",
    "<parameter=city>\n",
    "Paris\n</parameter>\n",
    "<parameter=zip>\n",
    "007\n</parameter>\n",
    "<parameter=days>\n",
    "3\n</parameter>\n",
    "</function>\n</tool_call>",
    "weather",
    "ok",
]
# greedy decoding after the generation prompt: the call, word by word, then the end
CHAIN = ["<|assistant|>", *WORDS[4:12], "</s>"]
# the shape of Qwen3.5's chat_template.jinja where it matters here: the tools' instructions
# name <tool_call> and <function=, and an earlier call is written back parameter by parameter
# from its arguments walked as pairs
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|user|> tools: {% for t in tools %}"
    "{{ t['function']['name'] }} {% endfor %}<tool_call> <function=NAME> <parameter=KEY> "
    "</parameter> </function> </tool_call> {% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<|user|> {{ m.content }} "
    "{% elif m.role == 'assistant' %}<|assistant|> {{ m.content or '' }}"
    "{% for tc in m.tool_calls or [] %}{% if tc.function is defined %}"
    "{% set tc = tc.function %}{% endif %}"
    "{{ '<tool_call>\\n<function=' + tc.name + '>\\n' }}"
    "{% for k, v in tc.arguments|items %}{{ '<parameter=' + k + '>\\n' }}"
    "{{ v | tojson if v is mapping or (v is sequence and v is not string) else v | string }}"
    "{{ '\\n</parameter>\\n' }}{% endfor %}{{ '</function>\\n</tool_call> ' }}{% endfor %}"
    "{% elif m.role == 'tool' %}<|user|> <tool_response> {{ m.content }} </tool_response> "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ASK = [{"role": "user", "content": "weather in Paris"}]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_xml")
    write_scripted_model(d, WORDS, CHAIN, TEMPLATE, eos="</s>", specials=4, bos="<s>", fuse=True)
    return d


@pytest.fixture(scope="module")
def oa(qwen_dir):
    for s in serving(qwen_dir):
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)


def test_a_qwen_xml_call_and_the_next_turn_through_the_server(oa, qwen_dir):
    r = oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=20
    )
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "zip": "007", "days": 3}
    # streamed: the same call, no markup as content
    content, calls = "", []
    for chunk in oa.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=20, stream=True
    ):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            calls += [tc.function.arguments for tc in ch.delta.tool_calls or []]
    assert content.strip() == "" and [json.loads(a) for a in calls] == [
        {"city": "Paris", "zip": "007", "days": 3}
    ]
    # the agent's next turn sends the call back as JSON text, with its result
    talk = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": call.function.model_dump()}
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    r = oa.chat.completions.create(
        model="tiny", messages=talk, tools=[WEATHER], temperature=0, max_tokens=20
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    # what the template made of it: each argument as the model wrote it
    prompt = Tokenizer.from_dir(qwen_dir).apply_chat_template(talk, tools=[WEATHER])
    assert (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=zip>\n007\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
        "</function>\n</tool_call>" in prompt
    )
    # arguments that are no JSON object: the template cannot walk them, a 400 names it
    bad = (
        talk[:1]
        + [
            {
                **talk[1],
                "tool_calls": [
                    {
                        **talk[1]["tool_calls"][0],
                        "function": {"name": "get_weather", "arguments": "Paris"},
                    }
                ],
            }
        ]
        + talk[2:]
    )
    with pytest.raises(openai.BadRequestError, match="chat template"):
        oa.chat.completions.create(model="tiny", messages=bad, tools=[WEATHER], max_tokens=4)
