"""Text <-> token ids through the model directory's tokenizer.json (Hugging Face tokenizers), or
Kimi's tiktoken.model read as the same (refmoe.tiktoken_bpe), and chat prompts through
tokenizer_config.json's chat_template (jinja2, sandboxed)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from refmoe import tiktoken_bpe


def markup() -> frozenset[str]:
    """The markers refmoe's reply readers look for (refmoe.tool_calls, refmoe.reasoning,
    refmoe.harmony): special tokens with these texts stay in decoded text."""
    from refmoe import harmony, reasoning, tool_calls

    marks = {m for pair in tool_calls.FORMATS.values() for m in pair}
    marks |= {m for pair in tool_calls.GROUPS.values() for m in pair}
    marks |= {"<｜tool▁sep｜>", "<|tool_call_argument_begin|>"}
    marks.add(tool_calls.DSML)  # DeepSeek-V4's markup token: "<" + it + "tool_calls>"
    return frozenset(marks | {reasoning.OPEN, reasoning.CLOSE} | set(harmony.MARKERS))


class Tokenizer:
    def __init__(self, path: Path, config: dict | None = None):
        """path: tokenizer.json, or a tiktoken.model (Kimi's) with config its tokenizer_config."""
        from tokenizers import Tokenizer as HFTokenizer

        self.config = config or {}
        self._kimi = path.name == "tiktoken.model"  # encodes a long text in pieces (cuts)
        if self._kimi:
            bos = self._token_text("bos_token")
            self._tok = tiktoken_bpe.build(path, self.config, f"{path.parent}", bos)
        else:
            try:
                self._tok = HFTokenizer.from_file(str(path))
            except Exception as e:  # the library raises its own exception types
                raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
        self.path = path
        self._max_chars: int | None = None
        self._drop: set[int] | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            path = model_dir / "tiktoken.model"  # Kimi's releases ship this instead
        if not path.exists():
            return None
        cfg_path = model_dir / "tokenizer_config.json"
        config = {}
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{cfg_path}: must be a JSON object")
        # transformers 5 saves the template beside the tokenizer as chat_template.jinja, and
        # reads it before tokenizer_config.json's chat_template, as here
        jinja = model_dir / "chat_template.jinja"
        if jinja.exists():
            try:
                config = {**config, "chat_template": jinja.read_text()}
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{jinja}: cannot be read ({e})") from None
        if not config.get("chat_template"):  # a release whose prompt format is Python code
            bundled = BUNDLED_TEMPLATES.get(_family(model_dir) or "")
            if bundled is not None:
                config = {**config, "chat_template": (TEMPLATES / bundled).read_text()}
        return cls(path, config)

    def encode(self, text: str, special: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: JSON allows it, text has none
            raise ValueError(
                f"the text is not valid Unicode ({e.reason} at character {e.start})"
            ) from None
        if self._kimi and len(text) > tiktoken_bpe.MAX_RUN:  # shorter: one piece
            pieces = tiktoken_bpe.cuts(text)
            ids = self._tok.encode(pieces[0], add_special_tokens=special).ids
            for piece in pieces[1:]:
                ids += self._tok.encode(piece, add_special_tokens=False).ids
            return ids
        return self._tok.encode(text, add_special_tokens=special).ids

    @property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: no token covers more of a text (a
        byte-level entry spells each byte as one character, so it is never shorter than the
        text it covers)."""
        if self._max_chars is None:
            self._max_chars = max((len(k) for k in self._tok.get_vocab(True)), default=1)
        return self._max_chars

    def encode_bounded(
        self, text: str, limit: int, special: bool = True, what: str = "prompt"
    ) -> list[int]:
        """encode(text), refusing at once (without tokenizing) a text that cannot fit in
        `limit` tokens: it needs at least len(text) / max_token_chars of them."""
        if len(text) > limit * self.max_token_chars:
            raise ValueError(
                f"{what}: {len(text):,} characters are at least "
                f"{len(text) // self.max_token_chars:,} tokens, more than the "
                f"context of {limit:,}"
            )
        try:
            ids = self.encode(text, special)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        if len(ids) > limit:
            raise ValueError(f"{what}: {len(ids):,} tokens exceed the context of {limit:,}")
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens, except those that are markup refmoe reads
        off a reply (tool-call and reasoning markers, gpt-oss's harmony channels: markup()),
        which some tokenizers mark special; the control tokens (bos, eos, pad, unk) always
        go."""
        drop = self._dropped_ids()
        return self._tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)

    def _dropped_ids(self) -> set[int]:
        if self._drop is None:
            added = self._tok.get_added_tokens_decoder()
            self._drop = {i for i, t in added.items() if t.special and t.content not in markup()}
            names = ("bos_token", "eos_token", "pad_token", "unk_token")
            control = (self._tok.token_to_id(self._token_text(k)) for k in names)
            self._drop |= {i for i in control if i is not None and i in added}
        return self._drop

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json writes it (Kimi's: the BPE refmoe builds from its
        tiktoken file), for libraries that read that form (refmoe.structured)."""
        return self._tok.to_str()

    def special_id(self, text: str) -> int | None:
        """The id of the special (added) token spelled `text`, if the tokenizer has one."""
        token = self._tok.token_to_id(text)
        added = self._tok.get_added_tokens_decoder()
        return token if token is not None and token in added and added[token].special else None

    @property
    def eos_id(self) -> int | None:
        """tokenizer_config.json's eos_token as an id, if it names one in the vocabulary."""
        text = self._token_text("eos_token")
        return self._tok.token_to_id(text) if text else None

    def _token_text(self, key: str) -> str:
        v = self.config.get(key)
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template or None

    # what apply_chat_template itself sets; extra variables may not
    TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")

    def check_template_variables(self, extra: dict | None) -> None:
        """A ValueError naming the variables in extra that the call itself sets."""
        taken = sorted(set(extra or ()) & set(self.TEMPLATE_VARIABLES))
        if taken:
            raise ValueError(f"{', '.join(taken)} are set by the call, not as template variables")

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        extra: dict | None = None,
    ) -> str:
        """The conversation rendered by the model's own template (tools: OpenAI's function
        specs, which templates that know tools render into the prompt; extra: the template's
        own variables, such as thinking or enable_thinking)."""
        self.check_template_variables(extra)
        template = self.chat_template
        if not template:
            raise ValueError(
                f"{self.path.parent}: no chat template (chat_template.jinja, or chat_template "
                "in tokenizer_config.json)"
            )
        from jinja2 import TemplateError

        env = _template_env()
        try:
            return env.from_string(template).render(
                **(extra or {}),
                messages=template_turns(messages),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text("bos_token"),
                eos_token=self._token_text("eos_token"),
            )
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            # a template that fails on what the request holds (a call's arguments it walks
            # as pairs but that are not a JSON object) fails the request, not the server
            raise ValueError(f"chat template: {e}") from None


class Detokenizer:
    """The text of a growing list of token ids, decoded as it grows: each add() decodes only
    the tokens since the last whole character, beside the ones before them back to the one
    before that (vLLM's prefix and read offsets: a decoder that spaces or strips at the start
    of what it decodes does the same to both), so a token costs the same at a reply's end as at
    its start, where decoding the whole reply every token grew with it (3.7 ms a token at 16K
    tokens on DeepSeek-V4's tokenizer, this VM). `text` holds whole characters only: a
    character whose UTF-8 bytes come over several tokens waits for its last one. full(): every
    token's text at once (an incomplete last character as U+FFFD, as decode gives it)."""

    __slots__ = ("tokenizer", "ids", "text", "prefix", "read")

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0  # ids[prefix:read] decoded last time; text ends at read

    def add(self, ids: list[int]) -> str:
        """Take ids; return the text they complete (appended to `text`)."""
        self.ids += ids
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before) :]
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def full(self) -> str:
        return self.tokenizer.decode(self.ids)


class ToolArguments(dict):
    """An earlier tool call's arguments as chat templates are handed them: the object that
    the client's JSON text (OpenAI's wire form) holds, which templates that walk them as pairs
    need (Qwen3.5, GLM, MiniMax: `arguments|items`; a string there fails), and that same text
    exactly wherever a template writes them out or joins them to a string (DeepSeek-V3.1:
    `... + arguments + ...`; `{{ arguments }}`). tojson writes the object."""

    __slots__ = ("text",)

    def __init__(self, text: str, value: dict):
        super().__init__(value)
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __add__(self, other):
        return self.text + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other):
        return other + self.text if isinstance(other, str) else NotImplemented


def template_turns(messages: list[dict]) -> list[dict]:
    """messages as a chat template is handed them: each assistant tool call's arguments given
    as the text of a JSON object become ToolArguments (other values stay as given). The
    caller's messages are not changed."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if isinstance(calls, list) and any(_arguments_text(c) is not None for c in calls):
            m = {**m, "tool_calls": [_with_arguments(c) for c in calls]}
        out.append(m)
    return out


def _arguments_text(call) -> str | None:
    f = call.get("function") if isinstance(call, dict) else None
    text = f.get("arguments") if isinstance(f, dict) else None
    return text if isinstance(text, str) and isinstance(_fromjson(text), dict) else None


def _with_arguments(call):
    text = _arguments_text(call)
    if text is None:
        return call
    return {
        **call,
        "function": {**call["function"], "arguments": ToolArguments(text, json.loads(text))},
    }


# Families whose releases ship their chat format as Python (DeepSeek-V4's
# encoding/encoding_dsv4.py) rather than a template: refmoe's template renders the same text.
TEMPLATES = Path(__file__).parent / "templates"
BUNDLED_TEMPLATES = {"deepseek_v4": "deepseek_v4.jinja", "deepseek_v32": "deepseek_v32.jinja"}


def _family(model_dir: Path) -> str | None:
    """The model family of config.json beside the tokenizer, if any (as refmoe.config reads
    it: the architecture, else the model type)."""
    from refmoe.config import ARCHITECTURES, MODEL_TYPES

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # no model config beside the tokenizer: no family to go by
    if not isinstance(cfg, dict):
        return None
    arch = cfg.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        return ARCHITECTURES.get(arch[0])
    return ARCHITECTURES.get(MODEL_TYPES.get(str(cfg.get("model_type")), ""))


def _fromjson(text: str):
    """JSON text -> its value, or None where it is not JSON (templates test the result)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=1)
def _template_env():
    """A sandboxed jinja2 environment that renders chat templates as transformers does (its
    apply_chat_template is the oracle): tojson as json.dumps, unicode and <, >, & kept as
    written (jinja2's own filter escapes them for HTML, and a tool whose description said
    "it's" or "<b>" reached the model as \\u0027 and \\u003c); break and continue in
    loops; strftime_now; {% generation %} blocks rendered as their body (transformers only
    marks their span)."""
    from datetime import datetime

    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.filters["fromjson"] = _fromjson  # refmoe's own (the bundled templates use it)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
