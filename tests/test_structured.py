"""Structured output (refmoe/structured.py): OpenAI's response_format holds a chat reply to a
JSON schema by masking, every step, the tokens that cannot continue it.

The oracle is the schema itself: a one-layer Qwen3-MoE with random weights writes noise, so
whatever it writes under a grammar conforms only because of the mask; the replies are parsed
and checked against the schema, greedy and sampled, whole and streamed, through the real
server and the openai client. The unit tests step a constraint through a known text token by
token, and refuse what cannot be held to, naming the field."""

import json

import pytest
from conftest import write_random_chat_model
from test_server import Server, serving

from refmoe import reasoning
from refmoe.sampling import Sampler, SamplingParams
from refmoe.structured import Grammars
from refmoe.tokenizer import Tokenizer

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

VOCAB = 600  # 256 bytes, the demo's 4 specials, merges of printable pairs
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "mood": {"enum": ["calm", "busy"]},
    },
    "required": ["ok", "n", "mood"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "status", "schema": SCHEMA}}


def conforms(value) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "n", "mood"}
        and isinstance(value["ok"], bool)
        and isinstance(value["n"], int)
        and not isinstance(value["n"], bool)
        and 0 <= value["n"] <= 9
        and value["mood"] in ("calm", "busy")
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("structured")
    write_random_chat_model(d, VOCAB)
    return d


@pytest.fixture(scope="module")
def grammars(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    return Grammars(tok, VOCAB, [tok.eos_id])


# -- the grammar and one constraint -----------------------------------------------------------


def test_formats_compile_or_are_refused_by_name(grammars):
    assert grammars.compile(None) is None and grammars.compile({"type": "text"}) is None
    assert grammars.compile({"type": "json_object"}) and grammars.compile(FORMAT)
    for bad, match in (
        ({"type": "yaml"}, r"response_format\.type"),
        ({"type": "json_schema"}, r"response_format\.json_schema\.schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "compile"),
        ("json", "an object"),
    ):
        with pytest.raises(ValueError, match=match):
            grammars.compile(bad)


def test_a_conforming_text_is_allowed_token_by_token(grammars, model_dir):
    tok = Tokenizer.from_dir(model_dir)
    text = '{"ok":true,"n":7,"mood":"busy"}'  # compact: no whitespace outside strings
    c = grammars.constraint(grammars.compile(FORMAT))
    ids = tok.encode(text, special=False)
    for i, t in enumerate(ids):
        assert not c.finished
        allowed = c.allowed()
        assert allowed[t] and allowed.sum() < VOCAB  # the text's token, not everything
        assert not allowed[tok.encode(" ", special=False)[0]]
        if i == len(ids) - 1:  # before the closing brace: no end yet
            assert not allowed[tok.eos_id]
        c.accept(t)
    # complete, nothing may follow (the schema allows no more): finished without an end token
    assert c.finished and c.error is None
    # a token the grammar refuses ends the reply (logged), never raises into the step
    c = grammars.constraint(grammars.compile(FORMAT))
    c.accept(tok.encode("x", special=False)[0])
    assert c.finished and c.error


def test_the_sampler_holds_to_the_grammar_and_a_gate(grammars, model_dir):
    import torch

    tok = Tokenizer.from_dir(model_dir)
    grammar = grammars.compile(FORMAT)
    rng = torch.Generator().manual_seed(1)
    for temperature in (0.0, 1.0):
        s = Sampler(SamplingParams(temperature, seed=3, constraint=grammars.constraint(grammar)))
        ids = []
        while not s.finished and len(ids) < 200:
            ids.append(s(torch.randn(VOCAB, generator=rng) * 5))
        assert s.finished, tok.decode(ids)  # random logits, held to the schema to its end
        assert conforms(json.loads(tok.decode(ids)))
    grammar = grammars.compile({"type": "json_object"})
    # gated: free until the gate token, held after it
    gate = tok.encode("#", special=False)[0]
    s = Sampler(SamplingParams(0.0, constraint=grammars.constraint(grammar, gate=gate)))
    free = torch.zeros(VOCAB)
    free[tok.encode("a", special=False)[0]] = 9.0
    assert s(free) == tok.encode("a", special=False)[0]  # not JSON, but still gated
    hint = torch.zeros(VOCAB)
    hint[gate] = 9.0
    assert s(hint) == gate
    after = tok.decode([s(free)])  # held now: "a" cannot start a JSON object
    assert after.lstrip().startswith("{") or not after.strip()


# -- through the server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def oa(model_dir):
    for s in serving(model_dir, 512):
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)


ASK = [{"role": "user", "content": "status?"}]


def test_replies_conform_to_the_schema(oa):
    free = oa.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):  # the random model alone writes no JSON
        json.loads(free.choices[0].message.content)
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0), (3, 1.0)):
        r = oa.chat.completions.create(
            model="tiny",
            messages=ASK,
            response_format=FORMAT,
            max_tokens=200,
            temperature=temperature,
            seed=seed,
        )
        assert r.choices[0].finish_reason == "stop"
        assert conforms(json.loads(r.choices[0].message.content)), r.choices[0].message.content
    text = ""
    for chunk in oa.chat.completions.create(
        model="tiny", messages=ASK, response_format=FORMAT, max_tokens=200, stream=True, seed=5
    ):
        for ch in chunk.choices:
            text += ch.delta.content or ""
    assert conforms(json.loads(text))
    # any object (the random model may write one that never closes within max_tokens)
    for seed in range(3):
        r = oa.chat.completions.create(
            model="tiny",
            messages=ASK,
            response_format={"type": "json_object"},
            max_tokens=16,
            temperature=1.0,
            seed=seed,
        )
        content = r.choices[0].message.content
        assert content.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)


def test_bad_formats_are_a_400_naming_the_field(oa):
    for bad in (
        {"type": "yaml"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
    ):
        with pytest.raises(openai.BadRequestError, match="response_format"):
            oa.chat.completions.create(model="tiny", messages=ASK, response_format=bad)


def test_a_thinking_reply_needs_its_end_as_one_token(model_dir, tmp_path):
    """A template that opens <think> leaves the reply inside it: the grammar would hold from
    the token that closes it, and this tokenizer spells </think> in pieces, so the request is
    refused by name rather than held wrongly."""
    import shutil

    d = tmp_path / "thinking"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] += "{% if add_generation_prompt %}<think>\n{% endif %}{# ...</think> #}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert len(Tokenizer.from_dir(d).encode(reasoning.CLOSE, special=False)) > 1
    s = Server(d, engine_kwargs={"max_context": 256})
    s.wait_ready()
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="reasoning block"):
            c.chat.completions.create(model="tiny", messages=ASK, response_format=FORMAT)
        r = c.chat.completions.create(model="tiny", messages=ASK, max_tokens=4)
        assert r.choices[0].finish_reason == "length"  # unconstrained: served as before
    finally:
        s.stop()


def test_generate_stops_where_the_grammar_ends(model_dir, grammars):
    from refmoe import models
    from refmoe.generate import generate

    tok = Tokenizer.from_dir(model_dir)
    _, m = models.load(model_dir)
    prompt = tok.encode(tok.apply_chat_template(ASK), special=False)
    for temperature in (0.0, 1.0):
        c = grammars.constraint(grammars.compile(FORMAT))
        g = generate(m, prompt, 100, SamplingParams(temperature, seed=7, constraint=c))
        assert g.finish_reason == "stop" and conforms(json.loads(tok.decode(g.token_ids)))


def test_anthropic_output_config_format(oa):
    anthropic = pytest.importorskip("anthropic")
    c = anthropic.Anthropic(base_url=str(oa.base_url).removesuffix("/v1/"), api_key="none")
    fmt = {"format": {"type": "json_schema", "schema": SCHEMA}}
    for temperature in (0.0, 1.0):  # (this client version has no temperature argument)
        r = c.messages.create(
            model="tiny",
            max_tokens=200,
            messages=ASK,
            output_config=fmt,
            extra_body={"temperature": temperature},
        )
        assert r.stop_reason == "end_turn" and conforms(json.loads(r.content[0].text))
    with pytest.raises(anthropic.BadRequestError, match="output_config"):
        c.messages.create(
            model="tiny", max_tokens=8, messages=ASK, output_config={"format": {"type": "x"}}
        )
    with pytest.raises(anthropic.BadRequestError, match="output_config"):
        c.messages.create(
            model="tiny",
            max_tokens=8,
            messages=ASK,
            output_config={"format": {"type": "json_schema", "schema": {"type": "nonsense"}}},
        )


# -- required and named tool calls held to the tools' schemas ----------------------------------

STATUS = {
    "type": "function",
    "function": {"name": "set_status", "parameters": SCHEMA},
}
PING = {
    "type": "function",
    "function": {
        "name": "ping",
        "parameters": {
            "type": "object",
            "properties": {"times": {"type": "integer", "minimum": 1, "maximum": 3}},
            "required": ["times"],
            "additionalProperties": False,
        },
    },
}
CALL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<｜User｜>tools: {% for t in tools %}{{ t.function.name }} "
    "{% endfor %}MARKUP{% endif %}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>"
    "{{ m.content }}{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content or '' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
MARKUP = {  # what tells each format in a template (tool_calls.format_of, harmony.is_harmony)
    "hermes": "<tool_call>{...}</tool_call>",
    "deepseek": "<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>",
    "kimi": "<|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{...}",
    "harmony": "<|channel|>commentary to=functions.NAME<|message|>{...}<|call|>",
    "glm": "<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>",
    "minimax": '<minimax:tool_call><invoke name="NAME"><parameter name="K">V</parameter>',
    "qwen3_coder": "<tool_call><function=NAME><parameter=K>V</parameter></function></tool_call>",
}


@pytest.fixture(scope="module", params=sorted(MARKUP))
def calling(request, tmp_path_factory):
    """A random model whose template teaches one tool-call format; for hermes, its call
    markers are special tokens of the tokenizer (the grammar must name them by id), for the
    others plain text."""
    from tokenizers import Tokenizer as HFTokenizer

    from refmoe import demo_tokenizer

    fmt = request.param
    d = tmp_path_factory.mktemp(f"calls_{fmt}")
    write_random_chat_model(d, VOCAB)
    if fmt == "hermes":
        demo_tokenizer.write(d, VOCAB - 2)
        hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
        hf.add_special_tokens(["<tool_call>", "</tool_call>"])
        hf.save(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CALL_TEMPLATE.replace("MARKUP", MARKUP[fmt])
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for s in serving(d, 512):
        yield fmt, d, openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)


def test_required_and_named_calls_follow_the_schemas(calling):
    fmt, d, oa = calling
    tok = Tokenizer.from_dir(d)
    if fmt == "hermes":
        assert tok.special_id("<tool_call>") is not None
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        r = oa.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[STATUS, PING],
            tool_choice={"type": "function", "function": {"name": "set_status"}},
            max_tokens=300,
            temperature=temperature,
            seed=seed,
        )
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "set_status" and conforms(json.loads(call.function.arguments))
    seen = set()
    for seed in range(6):
        r = oa.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[STATUS, PING],
            tool_choice="required",
            max_tokens=300,
            temperature=1.0,
            seed=seed,
        )
        (call,) = r.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        seen.add(call.function.name)
        if call.function.name == "ping":
            assert set(args) == {"times"} and args["times"] in (1, 2, 3)
        else:
            assert call.function.name == "set_status" and conforms(args)
    assert seen <= {"ping", "set_status"}
    with pytest.raises(openai.BadRequestError, match="response_format"):
        oa.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[STATUS],
            tool_choice="required",
            response_format=FORMAT,
            max_tokens=8,
        )


def test_tool_call_grammars_by_format(grammars, model_dir):
    assert grammars.tool_call("nonsense", [STATUS], None) is None
    tok = Tokenizer.from_dir(model_dir)
    note = {
        "type": "function",
        "function": {
            "name": "note",
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["text"],
            },
        },
    }
    # a string value is any text up to its close, markup and newlines included
    text = "<b>x</b>\n</parameter that is not\nits close"
    good = f"<parameter=text>\n{text}\n</parameter>\n<parameter=n>\n7\n</parameter>\n"
    for reply, accepted in (
        (good + "</function>\n</tool_call>", True),
        ("<parameter=text>\nshort\n</parameter>\n</function>\n</tool_call>", True),  # n optional
        ("<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>", False),  # text required
        ("<parameter=text>\nx\n</parameter>\n<parameter=n>\nseven\n</parameter>\n", False),
    ):
        c = grammars.constraint(grammars.tool_call("qwen3_coder", [note], "note"))
        ok = all((c.accept(t), c.error is None)[1] for t in tok.encode(reply, special=False))
        assert ok == accepted and (not accepted or c.finished), reply
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(ValueError, match="tools"):
        grammars.tool_call("hermes", [bad], "f")


def test_characters_split_over_byte_tokens_arrive_whole(oa):
    """The demo tokenizer spells CJK as UTF-8 bytes, one token each: until a character's last
    byte comes the decoded text ends in U+FFFD, which the engine must not send (it did, and
    the reply came out garbled, whole and streamed)."""
    word = "模型在本地运行｜▁"
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"enum": [word]}}}
    r = oa.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=60)
    assert r.choices[0].message.content == json.dumps(word, ensure_ascii=False)
    text = ""
    for chunk in oa.chat.completions.create(
        model="tiny", messages=ASK, response_format=fmt, max_tokens=60, stream=True
    ):
        for ch in chunk.choices:
            text += ch.delta.content or ""
    assert text == json.dumps(word, ensure_ascii=False)
