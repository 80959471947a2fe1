"""Tool calls: how a model writes them in its output, found there, as a stream or whole.

A family's chat template says which format its model writes, and the template is what tells
the model about the tools (the server hands it `tools`), so the format is read off the
template:

    hermes     <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call
               (Qwen3 and Qwen3-MoE, GLM-4.5's OpenAI-style templates, Hermes-style ones)
    deepseek   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGUMENTS}
               <｜tool▁call▁end｜>...<｜tool▁calls▁end｜> (DeepSeek-V3.1's template; V3-0324
               writes "function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```": both are read)
    glm        <tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...</tool_call>
               (GLM-4.5 and later: a string value raw, others as JSON)
    qwen3_coder <tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n...
               </function>\\n</tool_call> (Qwen3.5 / 3.6, Qwen3-Coder, Qwen3-Coder-Next: a string
               value raw, others as JSON, one newline either side)
    minimax    <minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="K">V</parameter>
               ...</invoke>...</minimax:tool_call> (MiniMax-M2: one block, several invokes)
    kimi       <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:I
               <|tool_call_argument_begin|>{ARGUMENTS}<|tool_call_end|>...
               <|tool_calls_section_end|> (Kimi-K2)
    dsml       <｜DSML｜tool_calls>\n<｜DSML｜invoke name="NAME">\n<｜DSML｜parameter name="K"
               string="true|false">V</｜DSML｜parameter>...</｜DSML｜invoke>...
               </｜DSML｜tool_calls> (DeepSeek-V4; V3.2 names the block function_calls:
               dsml-v32). One block, several invokes; string="true" marks a value written
               raw, "false" one written as JSON.

The formats that write each argument as text (glm, minimax, qwen3_coder) give no sign of its
type: a value is typed by the tool's own JSON schema for that parameter where the request gave
one (a string parameter keeps "123" or '{"a": 1}' as the string written; an integer, number,
boolean, null, object or array one reads the text as JSON), and read as JSON where that fails
or no schema names the parameter (typed_value).

ToolStream takes the decoded text as it grows and gives back the text that is surely content
(a piece that could be the start of a call marker is held back until it is decided) and each
call once it is complete. A call whose arguments are not a JSON object is an error that names
the tool: a server answers it as the model's failure, not the client's.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

DSML = "｜DSML｜"  # DeepSeek-V4 and V3.2's markup token (fullwidth bars)
FORMATS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "deepseek": ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"),
    "glm": ("<tool_call>", "</tool_call>"),
    "qwen3_coder": ("<tool_call>", "</tool_call>"),
    "minimax": ("<minimax:tool_call>", "</minimax:tool_call>"),
    "kimi": ("<|tool_call_begin|>", "<|tool_call_end|>"),
    "dsml": (f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"),
    "dsml-v32": (f"<{DSML}function_calls>", f"</{DSML}function_calls>"),
}
# what in a chat template tells its format, most specific first (GLM's and Qwen3-Coder's
# calls open as Hermes's)
_TOLD_BY = (
    ("glm", ("<arg_key>",)),
    ("qwen3_coder", ("<tool_call>", "<function=")),
    ("minimax", ("<minimax:tool_call>",)),
    ("kimi", ("<|tool_call_begin|>",)),
    ("dsml", (f"<{DSML}tool_calls>",)),
    ("dsml-v32", (f"<{DSML}function_calls>",)),
    ("hermes", ("<tool_call>",)),
    ("deepseek", ("<｜tool▁call▁begin｜>",)),
)
# markers around a group of calls that are not content
GROUPS = {
    "deepseek": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
    "kimi": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
}


class ToolCallError(ValueError):
    """The model wrote a tool call that cannot be read."""


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def format_of(template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model; None: it has none."""
    if not template:
        return None
    return next((name for name, signs in _TOLD_BY if all(x in template for x in signs)), None)


def opening(fmt: str, name: str | None = None) -> str:
    """What the assistant's reply starts with when a call is required (tool_choice
    "required", or one named tool): appended to the prompt, so the model continues a call."""
    start = FORMATS[fmt][0]
    if fmt == "hermes":
        return start + "\n" + (f'{{"name": "{name}", "arguments": ' if name else "")
    if fmt == "glm":
        return start + (f"{name}\n" if name else "")
    if fmt == "qwen3_coder":
        return start + "\n" + (f"<function={name}>\n" if name else "")
    if fmt == "minimax":
        return start + "\n" + (f'<invoke name="{name}">\n' if name else "")
    if fmt in ("dsml", "dsml-v32"):
        return "\n\n" + start + "\n" + (f'<{DSML}invoke name="{name}">\n' if name else "")
    if fmt == "kimi":
        return (
            GROUPS[fmt][0]
            + start
            + (f"functions.{name}:0<|tool_call_argument_begin|>" if name else "")
        )
    return (GROUPS[fmt][0] + start) + (f"{name}<｜tool▁sep｜>" if name else "")


def _value(text: str):
    """An argument written as text with no type known: JSON where it reads as JSON, else the
    string as written (without the whitespace around it)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_NOT = object()  # a text that does not read as the type asked for
_JSON_TYPES = {"object": dict, "array": list}


def _as_type(text: str, kind: str):
    """text read as one JSON Schema type, or _NOT."""
    t = text.strip()
    if kind == "boolean":
        return {"true": True, "false": False}.get(t.lower(), _NOT)
    if kind == "null":
        return None if t.lower() in ("null", "none") else _NOT
    try:
        v = json.loads(t)
    except json.JSONDecodeError:
        return _NOT
    if kind == "integer":
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v if isinstance(v, int) and not isinstance(v, bool) else _NOT
    if kind == "number":
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else _NOT
    want = _JSON_TYPES.get(kind)
    return v if want is not None and isinstance(v, want) else _NOT


def schema_types(schema) -> list[str]:
    """The JSON types a parameter's schema allows, in the order it names them: its "type" (a
    name or a list), then those of its anyOf / oneOf branches; [] where it names none."""
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    kinds = [t] if isinstance(t, str) else []
    if isinstance(t, list):
        kinds = [x for x in t if isinstance(x, str)]
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key) or []:
            kinds += [k for k in schema_types(branch) if k not in kinds]
    return kinds


def typed_value(text: str, schema=None):
    """An argument written as text (GLM, MiniMax, Qwen3-Coder), typed by its parameter's JSON
    schema: the first of the schema's non-string types the text reads as, else the text as
    written where a string is allowed; with no schema, or when nothing fits, _value's guess.
    So a string parameter keeps "007" or '{"a": 1}' as written, where the guess would make
    them 7 and an object."""
    kinds = schema_types(schema)
    for kind in kinds:
        if kind != "string":
            v = _as_type(text, kind)
            if v is not _NOT:
                return v
    return text if "string" in kinds else _value(text)


def tool_parameters(specs: list[dict] | None) -> dict[str, dict]:
    """{tool name: {parameter: its JSON schema}} from OpenAI function specs."""
    out: dict[str, dict] = {}
    for spec in specs or ():
        f = spec.get("function", spec) if isinstance(spec, dict) else {}
        params = f.get("parameters") if isinstance(f, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(f.get("name"), str):
            out[f["name"]] = props if isinstance(props, dict) else {}
    return out


def _arguments(name: str, pairs, params: dict[str, dict], strip: bool = True) -> ToolCall:
    """A call from its (key, text) pairs, each typed by tool `name`'s schema (typed_value);
    strip: the text loses the whitespace around it (GLM, MiniMax), else one newline each side
    (Qwen3-Coder writes the value on lines of its own)."""
    schemas, args = params.get(name, {}), {}
    for key, text in pairs:
        key = key.strip()
        if strip:
            text = text.strip()
        else:
            text = text.removeprefix("\n").removesuffix("\n")
        args[key] = typed_value(text, schemas.get(key))
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


_QWEN_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|$)", re.S)
# a parameter runs to its closing tag, or (left open) to the next parameter or the end
_QWEN_PARAM = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


def _read_qwen3_coder(body: str, params: dict[str, dict]) -> list[ToolCall]:
    """Qwen3-Coder / Qwen3.5's block: each <function=NAME>'s parameters, one per
    <parameter=KEY> with its value on the lines between."""
    calls = [
        _arguments(m.group(1).strip(), _QWEN_PARAM.findall(m.group(2)), params, strip=False)
        for m in _QWEN_FUNCTION.finditer(body)
    ]
    if not calls or not all(c.name for c in calls):
        raise ToolCallError(f"a Qwen3-Coder tool call has no <function=NAME>: {body[:200]!r}")
    return calls


_DSML_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*?)</{DSML}invoke>', re.S)
_DSML_PARAM = re.compile(
    rf'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?)</{DSML}parameter>', re.S
)


def _read_dsml(body: str) -> list[ToolCall]:
    """DeepSeek-V4 / V3.2's block: each invoke's parameters, a string="true" value as written,
    a string="false" one as JSON."""
    calls = []
    for m in _DSML_INVOKE.finditer(body):
        name, args = m.group(1).strip(), {}
        for key, is_str, value in _DSML_PARAM.findall(m.group(2)):
            if key in args:
                raise ToolCallError(f"tool {name!r}: parameter {key!r} given twice")
            if is_str == "true":
                args[key] = value
                continue
            try:
                args[key] = json.loads(value)
            except json.JSONDecodeError as e:
                raise ToolCallError(
                    f"tool {name!r}: parameter {key!r} is marked non-string but is not JSON ({e})"
                ) from None
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    if not calls:
        raise ToolCallError(f"a DSML tool-call block has no invoke: {body[:200]!r}")
    return calls


def _read_all(fmt: str, body: str, params: dict[str, dict] | None = None) -> list[ToolCall]:
    """The calls in one block (MiniMax's, DSML's and Qwen3-Coder's may hold several; the others
    one). params: tool_parameters of the request's tools, which type the text-written values."""
    params = params or {}
    if fmt in ("dsml", "dsml-v32"):
        return _read_dsml(body)
    if fmt == "qwen3_coder":
        return _read_qwen3_coder(body, params)
    if fmt != "minimax":
        return [_read(fmt, body, params)]
    calls = []
    for m in re.finditer(r'<invoke name="([^"]*)">(.*?)</invoke>', body, re.S):
        pairs = re.findall(r'<parameter name="([^"]*)">(.*?)</parameter>', m.group(2), re.S)
        calls.append(_arguments(m.group(1).strip(), pairs, params))
    if not calls:
        raise ToolCallError(f"a MiniMax tool call has no <invoke>: {body[:200]!r}")
    return calls


def _read(fmt: str, body: str, params: dict[str, dict]) -> ToolCall:
    body = body.strip()
    if fmt == "glm":
        name = body.partition("<arg_key>")[0].strip()
        pairs = re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", body, re.S)
        if not name:
            raise ToolCallError(f"a GLM tool call has no name: {body[:200]!r}")
        return _arguments(name, pairs, params)
    if fmt == "kimi":
        head, sep, rest = body.partition("<|tool_call_argument_begin|>")
        if not sep:
            raise ToolCallError(f"a Kimi tool call has no arguments: {body[:200]!r}")
        name = head.strip().removeprefix("functions.").rsplit(":", 1)[0]
        try:
            args = json.loads(rest)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool {name!r}: its arguments are not JSON ({e})") from None
        if not isinstance(args, dict):
            raise ToolCallError(f"tool {name!r}: its arguments are not a JSON object")
        return ToolCall(name, json.dumps(args, ensure_ascii=False))
    if fmt == "hermes":
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"a tool call is not JSON ({e}): {body[:200]!r}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ToolCallError(f"a tool call has no name: {body[:200]!r}")
        name, args = obj["name"], obj.get("arguments", {})
    else:
        head, sep, rest = body.partition("<｜tool▁sep｜>")
        if not sep:
            raise ToolCallError(f"a tool call has no <｜tool▁sep｜>: {body[:200]!r}")
        name = head.strip()
        if name == "function":  # V3-0324: function<sep>NAME\n```json\n{...}\n```
            name, _, rest = rest.partition("\n")
            rest = re.sub(r"^\s*```(?:json)?|```\s*$", "", rest.strip())
        try:
            args = json.loads(rest)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool {name!r}: its arguments are not JSON ({e})") from None
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ToolCallError(f"tool {name!r}: its arguments are not a JSON object") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"tool {name!r}: its arguments are not a JSON object")
    return ToolCall(name.strip(), json.dumps(args, ensure_ascii=False))


class ToolStream:
    """Feed the whole decoded text so far; get (new content, newly completed calls)."""

    def __init__(self, fmt: str, prefix: str = "", tools: list[dict] | None = None):
        self.fmt = fmt
        self.params = tool_parameters(tools)  # what types the text-written values
        self.start, self.end = FORMATS[fmt]
        self.group = GROUPS.get(fmt, ())
        self.text = prefix  # what the reply began with (a required call's opening)
        self.done = 0  # characters of text consumed
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """text: the reply decoded so far (without the opening). final: nothing follows (an
        unfinished call is then an error)."""
        full = self._full(text)
        content, calls, i = [], [], self.done
        while i < len(full):
            at = full.find(self.start, i)
            if at < 0:
                # hold back a tail that could begin a marker
                keep = 0 if final else partial_marker(full[i:], (self.start, *self.group))
                content.append(full[i : len(full) - keep])
                i = len(full) - keep
                break
            content.append(full[i:at])
            close = full.find(self.end, at + len(self.start))
            if close < 0:
                if final:
                    raise ToolCallError(f"a tool call never ends: {full[at : at + 200]!r}")
                i = at
                break
            calls += _read_all(self.fmt, full[at + len(self.start) : close], self.params)
            i = close + len(self.end)
        self.done = i
        self.calls += calls
        text_out = "".join(content)
        for marker in self.group:
            text_out = text_out.replace(marker, "")
        return text_out, calls

    def _full(self, text: str) -> str:
        return self.text + text


def partial_marker(tail: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of tail that is a proper start of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(tail)), 0, -1):
            if tail.endswith(m[:n]):
                best = max(best, n)
                break
    return best


# ---------------------------------------------------------------------------------------------
# Anthropic's Messages API in OpenAI's shapes (what chat templates are written for)
# ---------------------------------------------------------------------------------------------


def from_anthropic_tools(tools: list[dict]) -> list[dict]:
    """[{"name", "description", "input_schema"}] -> OpenAI function specs."""
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t.get("description") or "",
                "parameters": t.get("input_schema") or {"type": "object"},
            },
        }
        for t in tools
    ]


def from_anthropic_turn(role: str, blocks: list[dict]) -> list[dict]:
    """One Anthropic turn (content blocks) as OpenAI-shaped turns: an assistant's tool_use
    blocks become its tool_calls; a user's tool_result blocks become "tool" turns (before the
    user's text, as the results answer the calls)."""
    text = "".join(b.get("text") or "" for b in blocks if b["type"] == "text")
    if role == "assistant":
        calls = [
            {
                "id": b["id"],
                "type": "function",
                "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})},
            }
            for b in blocks
            if b["type"] == "tool_use"
        ]
        turn: dict = {"role": "assistant", "content": text}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    out = []
    for b in blocks:
        if b["type"] == "tool_result":
            c = b.get("content")
            if isinstance(c, list):
                c = "".join(x.get("text") or "" for x in c if x.get("type") == "text")
            out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": c or ""})
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def as_anthropic_block(call: ToolCall) -> dict:
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": json.loads(call.arguments),
    }
