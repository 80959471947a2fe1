"""Structured output: a reply held to a JSON schema (OpenAI's `response_format`) by masking, at
every step, the tokens that cannot continue a text the schema accepts.

    grammar      the schema as llguidance compiles it (the library vLLM, SGLang and llama.cpp use
                 for the same: a mask over a 150K-token vocabulary in tens of microseconds);
                 `{"type": "json_object"}` is any JSON object, `{"type": "json_schema",
                 "json_schema": {"schema": ...}}` that schema; a schema llguidance cannot
                 compile is refused with its reason, naming the field
    constraint   one request's matcher: before each choice the logits of every token the
                 grammar forbids go to -inf (refmoe.sampling.Sampler), after it the token is
                 consumed; once the text is complete only an end-of-sequence token is allowed,
                 and the request finishes when the matcher has stopped
    whitespace   none outside strings (compact JSON, as OpenAI's structured outputs write it)
    gate         a reply that starts inside a reasoning block (<think>) is free until the block
                 ends: the grammar holds from the token that closes it
    tool calls   a required or named call (Grammars.tool_call): after the opening the server
                 appends, one call in the template's format whose arguments the tool's schema
                 accepts, then the markup that ends it

The tokenizer the masks are over is the model's own (tokenizer.json, or Kimi's tiktoken file as
refmoe reads it), with the logits' vocabulary size, built once per tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING

import numpy as np

from refmoe.tool_calls import schema_types

if TYPE_CHECKING:
    import torch

    from refmoe.tokenizer import Tokenizer

log = logging.getLogger("refmoe.structured")


# compact JSON: no whitespace outside strings. With whitespace free between tokens, a model that
# favours newlines writes them until max_tokens (a random one does at once; served models are
# known to); a schema may still ask for it with its own "x-guidance" options.
JSON_DEFAULTS = {"whitespace_flexible": False}


class Grammars:
    """The model's tokenizer as llguidance reads it, and the grammars of response formats."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance

        self.vocab_size = vocab_size
        self.text_tokenizer = tokenizer
        eos = list(eos_ids) or [i for i in [tokenizer.eos_id] if i is not None]
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.backend_json(), n_vocab=vocab_size, eos_token=eos or None
        )

    def compile(self, response_format, field: str = "response_format") -> str | None:
        """The grammar of an OpenAI response_format (None: "text", free); a ValueError naming
        the field for anything else or a schema that does not compile."""
        from llguidance import LLMatcher

        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise ValueError(f"{field}: an object with a type")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            given = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(given, dict):
                raise ValueError(f"{field}.json_schema.schema: a JSON schema (an object)")
            schema = given
        else:
            raise ValueError(f'{field}.type: "text", "json_object" or "json_schema", got {kind!r}')
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(_compact(schema)))
        except (ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"{field}: the schema does not compile ({e})") from None
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"{field}: the schema does not compile ({error})")
        return grammar

    def tool_call(self, fmt: str, specs: list[dict], name: str | None) -> str | None:
        """The grammar of what follows a required call's opening (tool_calls.opening(fmt,
        name), harmony.opening(name); name None: any of the tools): one call whose arguments
        the tool's JSON schema accepts, written as the format writes them, then the markup
        that ends it. JSON arguments (hermes, deepseek, kimi, harmony) are held to the schema
        whole; text ones (glm, minimax, qwen3_coder) parameter by parameter in the schema's
        order, the required ones present, a string's value any text that does not close it,
        every other type's a JSON value of that schema. None for a format it does not know."""
        from llguidance import LLMatcher

        form = _CALL_FORMS.get(fmt)
        if form is None:
            return None
        head, param, end = form
        tools = {t["function"]["name"]: t["function"].get("parameters") or {} for t in specs}
        rules, calls = [], []
        for i, n in enumerate([name] if name else list(tools)):
            schema = tools[n] if isinstance(tools[n], dict) else {}
            if param is None:  # JSON arguments, whole
                rules.append(f"args{i}: %json {json.dumps(_compact(schema))}")
                args = f"args{i}"
            else:
                args = self._parameters(i, schema, param, rules)
            calls.append(args if name else f"{self._seq(head.replace('NAME', n))} {args}")
        lark = "\n".join([f"start: call {self._seq(end)}", "call: " + " | ".join(calls), *rules])
        grammar = LLMatcher.grammar_from_lark(lark + "\n")
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"tools: a parameters schema does not compile ({error})")
        return grammar

    def _parameters(self, i: int, schema: dict, param: tuple[str, str], rules: list[str]) -> str:
        """Tool i's text-written parameters (glm, minimax, qwen3_coder) in Lark: each in the
        schema's order, optional unless required; their rules go to `rules`."""
        opens, close = param  # what opens a value (KEY: its name), what closes it
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = set(schema.get("required") or [])
        marker = _MARKUP.search(close)
        special = marker is not None and self.text_tokenizer.special_id(marker[0]) is not None
        parts = []
        for k, (key, sub) in enumerate(props.items()):
            rule, kinds = f"p{i}_{k}", schema_types(sub)
            opener = self._seq(opens.replace("KEY", key))
            choices = sub.get("enum") if isinstance(sub, dict) else None
            if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
                alts = " | ".join(_lark_literal(c) for c in choices)  # written raw, as text
                rules.append(f"{rule}: {opener} ({alts}) {self._seq(close)}")
            elif kinds and "string" not in kinds:  # a JSON value, then the close
                rules.append(f"{rule}: {opener} v{i}_{k} {self._seq(close)}")
                rules.append(f"v{i}_{k}: %json {json.dumps(_compact(sub))}")
            elif special:  # the close is a token no text holds: any text before it
                rules.append(f"{rule}: {opener} T{i}_{k} {self._seq(close)}")
                rules.append(f"T{i}_{k}: /(?s:.*)/")
            else:  # any text to the first close, close included: one lexeme
                c = _regex_escape(close)
                rules.append(f"{rule}: {opener} T{i}_{k}")
                rules.append(f"T{i}_{k}: /(?s:.*){c}/ & ~/(?s:.*{c}(?s:.)+)/")
            parts.append(rule if key in required else f"{rule}?")
        return " ".join(parts) if parts else '""'

    def _seq(self, text: str) -> str:
        """Fixed call markup in Lark: each <...> that the tokenizer has as a special token by
        its id (a grammar's strings never match special tokens), the rest as text."""
        out = []
        for piece in _MARKUP.split(text):
            if not piece:
                continue
            token = self.text_tokenizer.special_id(piece) if _MARKUP.fullmatch(piece) else None
            out.append(f"<[{token}]>" if token is not None else _lark_literal(piece))
        return " ".join(out) if out else '""'

    def constraint(self, grammar: str, gate: int | None = None) -> Constraint:
        return Constraint(self, grammar, gate)


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    """text as a literal inside a Lark /regex/."""
    return "".join("\\" + ch if ch in "\\/.^$*+?()[]{}|" else ch for ch in text).replace(
        "\n", "\\n"
    )


def _compact(schema: dict) -> dict:
    """A JSON schema with refmoe's JSON defaults as its own options (Lark's %json)."""
    return {**schema, "x-guidance": {**JSON_DEFAULTS, **(schema.get("x-guidance") or {})}}


# How each format writes the rest of a call after its opening: (the call's head when any tool
# may be called, NAME its name; how a text-written parameter opens, KEY its name, and closes,
# None where the arguments are one JSON object; the markup that ends the call).
_CALL_FORMS: dict[str, tuple[str, tuple[str, str] | None, str]] = {
    "hermes": ('{"name": "NAME", "arguments": ', None, "}\n</tool_call>"),
    "deepseek": ("NAME<｜tool▁sep｜>", None, "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "kimi": (
        "functions.NAME:0<|tool_call_argument_begin|>",
        None,
        "<|tool_call_end|><|tool_calls_section_end|>",
    ),
    "harmony": ("NAME <|constrain|>json<|message|>", None, "<|call|>"),
    "glm": ("NAME\n", ("<arg_key>KEY</arg_key>\n<arg_value>", "</arg_value>\n"), "</tool_call>"),
    "minimax": (
        '<invoke name="NAME">\n',
        ('<parameter name="KEY">', "</parameter>\n"),
        "</invoke>\n</minimax:tool_call>",
    ),
    "qwen3_coder": (
        "<function=NAME>\n",
        ("<parameter=KEY>\n", "\n</parameter>\n"),
        "</function>\n</tool_call>",
    ),
}
_MARKUP = re.compile(r"(<[^<>\n]+>)")  # a piece of markup that may be one special token


class Constraint:
    """One request's grammar, stepped token by token (see the module's docstring). gate: a
    token id before which the reply is free (the end of a reasoning block), or None. A matcher
    that fails (llguidance's own error) ends its request, logged; it never raises into the
    decode step that other requests share."""

    def __init__(self, grammars: Grammars, grammar: str, gate: int | None = None):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(grammars.tokenizer, grammar, log_level=0)  # we log failures
        self.vocab_size = grammars.vocab_size
        self.gate = gate
        self.error: str | None = None
        self.bits = np.zeros((grammars.vocab_size + 31) // 32, np.int32)

    @property
    def active(self) -> bool:
        return self.gate is None and self.error is None

    @property
    def finished(self) -> bool:
        """The text is complete and its end consumed (or the matcher failed): nothing more
        may follow."""
        return self.error is not None or (self.gate is None and self.matcher.is_stopped())

    def allowed(self) -> np.ndarray | None:
        """bool [vocab]: the tokens the grammar allows next; None where the matcher failed."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.matcher.is_error():
            self._fail(self.matcher.get_error())
            return None
        bits = np.unpackbits(self.bits.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with the tokens the grammar forbids at -inf (as they are while gated)."""
        allowed = self.allowed() if self.active else None
        if allowed is None:
            return logits
        import torch

        keep = torch.from_numpy(allowed[: logits.numel()])
        return logits.masked_fill(~keep, float("-inf"))

    def accept(self, token: int) -> None:
        """The chosen token, consumed (or, while gated, checked against the gate)."""
        if self.gate is not None:
            if token == self.gate:
                self.gate = None
        elif self.error is None and not self.matcher.consume_token(token):
            self._fail(self.matcher.get_error() or f"token {token} refused")

    def _fail(self, error: str) -> None:
        self.error = error
        log.warning("structured output: the grammar's matcher failed (%s); reply ended", error)
