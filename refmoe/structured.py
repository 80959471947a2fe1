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

The tokenizer the masks are over is the model's own (tokenizer.json, or Kimi's tiktoken file as
refmoe reads it), with the logits' vocabulary size, built once per tokenizer.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from llguidance._lib import JsonCompileOptions

    from refmoe.tokenizer import Tokenizer

log = logging.getLogger("refmoe.structured")


# compact JSON: no whitespace outside strings. With whitespace free between tokens, a model that
# favours newlines writes them until max_tokens (a random one does at once; served models are
# known to); a schema may still ask for it with its own "x-guidance" options.
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}


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
            schema: object = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ValueError(f"{field}.json_schema.schema: a JSON schema (an object)")
        else:
            raise ValueError(f'{field}.type: "text", "json_object" or "json_schema", got {kind!r}')
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
        except (ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"{field}: the schema does not compile ({e})") from None
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"{field}: the schema does not compile ({error})")
        return grammar

    def tool_call(self, fmt: str, specs: list[dict], name: str | None) -> str | None:
        """The grammar of what follows a required call's opening (tool_calls.opening(fmt,
        name); name None: any of the tools): one call whose arguments the tool's JSON schema
        accepts, then the markup that ends it. For the formats that write arguments as JSON
        (hermes, deepseek, kimi); None for the others, whose calls are read as written."""
        from llguidance import LLMatcher

        schemas = {
            t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
            for t in specs
        }
        rules, names = [], [name] if name else list(schemas)
        for i, n in enumerate(names):
            args = {**schemas[n], "x-guidance": dict(JSON_DEFAULTS)}
            rules.append(f"args{i}: %json {json.dumps(args)}")
        lit, mark = _lark_literal, self._marker
        if fmt == "hermes":  # <tool_call>\n{"name": N, "arguments": {...}}\n</tool_call>
            head = [lit(f'{{"name": "{n}", "arguments": ') for n in names] if not name else [""]
            body = [f"{h} args{i} {lit('}')}" for i, h in enumerate(head)]
            end = f"{lit(chr(10))} {mark('</tool_call>')}"
        elif fmt == "deepseek":  # NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜><｜tool▁calls▁end｜>
            sep = mark("<｜tool▁sep｜>")
            head = [f"{lit(n)} {sep}" for n in names] if not name else [""]
            body = [f"{h} args{i}" for i, h in enumerate(head)]
            end = f"{mark('<｜tool▁call▁end｜>')} {mark('<｜tool▁calls▁end｜>')}"
        elif fmt == "kimi":  # functions.NAME:0<|tool_call_argument_begin|>{...}<|tool_call_end|>
            arg = mark("<|tool_call_argument_begin|>")
            head = [f"{lit(f'functions.{n}:0')} {arg}" for n in names] if not name else [""]
            body = [f"{h} args{i}" for i, h in enumerate(head)]
            end = f"{mark('<|tool_call_end|>')} {mark('<|tool_calls_section_end|>')}"
        else:
            return None
        lark = "\n".join([f"start: call {end}", "call: " + " | ".join(body), *rules]) + "\n"
        grammar = LLMatcher.grammar_from_lark(lark)
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"tools: a parameters schema does not compile ({error})")
        return grammar

    def _marker(self, text: str) -> str:
        """A call marker in Lark: the special token where the tokenizer has one for it (a
        grammar's strings never match special tokens), else the text."""
        token = self.text_tokenizer.special_id(text)
        return f"<[{token}]>" if token is not None else _lark_literal(text)

    def constraint(self, grammar: str, gate: int | None = None) -> Constraint:
        return Constraint(self, grammar, gate)


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


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
