"""`refmoe serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the engine.

/v1/completions and /v1/chat/completions (SSE streaming ending in `data: [DONE]`, usage on
request with stream_options.include_usage), /v1/models, /tokenize, /detokenize, /health (503
while the model loads, 200 when ready), /metrics (Prometheus). Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with 400 for bad requests, 401 for a wrong
API key, 404 for another model's name, 429 (with Retry-After) when the admission queue is
full, 413 for a body over the cap, 503 while loading or shutting down.

What a client can count on (docs/serving.md):
- disconnect: a client that hangs up cancels only its own request; the worker that runs it
  drops it at the next step boundary and frees its KV there; no other request is touched;
- shutdown (SIGTERM, SIGINT): admission stops (503), requests in flight get up to --drain-s to
  finish, then each remaining stream ends with an OpenAI-shaped error event and `[DONE]` (a
  non-streamed request gets a 503 body) before the HTTP server closes any connection;
- oversized input: a body over --max-body-mb is refused (413) before the rest is read; text is
  tokenized off the event loop, and a text that cannot fit the context is refused before it is
  tokenized, so no request stalls another's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from refmoe import harmony, reasoning, tool_calls
from refmoe.engine import Engine, QueueFull, ShuttingDown
from refmoe.metrics import Metrics
from refmoe.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob

log = logging.getLogger("refmoe.server")
MAX_STOPS, MAX_STOP_CHARS = 16, 256

# ---------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI's API does; known ones are checked)
# ---------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(..., description="text, or token ids")
    echo: bool = False
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="each token's log-probability and this many likeliest alternatives",
    )


class ContentPart(BaseModel):
    """One part of a message's content as OpenAI's API sends it; only text is understood."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: ToolFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: which call it answers
    name: str | None = None
    reasoning_content: str | None = None  # an assistant's earlier reasoning (agent loops)

    def as_turn(self) -> dict:
        """{"role", "content"} with the content's text parts joined, and the tool fields that
        are set, for the chat template."""
        c = self.content
        text = "".join(p.text for p in c) if isinstance(c, list) else c
        turn = {"role": self.role, "content": text}
        for key in ("tool_calls", "tool_call_id", "name", "reasoning_content"):
            if getattr(self, key) is not None:
                turn[key] = getattr(self, key)
        return turn

    @property
    def chars(self) -> int:
        c = self.content
        return sum(len(p.text) for p in c) if isinstance(c, list) else len(c or "")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: str | dict | None = Field(
        None, description='"none", "auto", "required", or {"type": "function", "function": {...}}'
    )
    max_completion_tokens: int | None = Field(None, ge=1)
    reasoning_effort: Literal["minimal", "low", "medium", "high", "max"] | None = Field(
        None,
        description="the template's reasoning_effort variable (gpt-oss: its Reasoning level; "
        'DeepSeek-V4: "max" adds its preamble in thinking mode)',
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="variables for the chat template, as vLLM and SGLang take them: "
        '{"thinking": true} (DeepSeek-V3.1, V4), {"enable_thinking": false} (Qwen3)',
    )
    logprobs: bool | None = Field(None, description="each reply token's log-probability")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="this many likeliest alternatives per token"
    )
    response_format: dict | None = Field(
        None,
        description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
        '"json_schema": {"name": ..., "schema": {...}}}: the reply held to that JSON '
        "(refmoe.structured)",
    )


class AnthropicBlock(BaseModel):
    """A content block: text, an assistant's tool_use, or a user's tool_result."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "tool_use", "tool_result"]
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = None
    content: str | list[dict] | None = None

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        need = {"text": ("text",), "tool_use": ("id", "name"), "tool_result": ("tool_use_id",)}
        for f in need[self.type]:
            if getattr(self, f) is None:
                raise ValueError(f"a {self.type} block needs {f}")
        return self


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    input_schema: dict


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]

    def as_turns(self) -> list[dict]:
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        blocks = [b.model_dump() for b in self.content]
        return tool_calls.from_anthropic_turn(self.role, blocks)


class MessagesRequest(BaseModel):
    """Anthropic's Messages API (/v1/messages), text content."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int = Field(..., ge=1)
    messages: list[AnthropicMessage] = Field(..., min_length=1)
    system: str | list[ContentPart] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: dict | None = None
    thinking: dict | None = Field(
        None,
        description='{"type": "enabled", "budget_tokens": N} or {"type": "disabled"}: sets the '
        "chat template's thinking switches (thinking: DeepSeek-V3.1/V3.2/V4; enable_thinking: "
        "Qwen3); absent, the template's default",
    )
    output_config: dict | None = Field(
        None,
        description='{"format": {"type": "json_schema", "schema": {...}}}: the reply held to '
        "that JSON (refmoe.structured); effort is not read",
    )

    def response_format(self) -> dict | None:
        """output_config.format in OpenAI's response_format shape (the one grammar path)."""
        fmt = (self.output_config or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise APIError(
                400,
                'output_config.format: {"type": "json_schema", "schema": {...}}',
                param="output_config",
            )
        if not isinstance(fmt.get("schema"), dict):
            raise APIError(
                400,
                "output_config.format.schema: a JSON schema (an object)",
                param="output_config",
            )
        return {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}}


def thinking_variables(thinking: dict | None) -> dict[str, bool]:
    """Anthropic's thinking parameter as chat-template variables (the families' own names for
    the switch; a template reads the one it knows)."""
    if thinking is None:
        return {}
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled"):
        raise APIError(400, 'thinking: type must be "enabled" or "disabled"', param="thinking")
    on = kind == "enabled"
    return {"thinking": on, "enable_thinking": on}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict | None = None,
    anthropic: bool = False,
) -> JSONResponse:
    """OpenAI's error shape, or Anthropic's (on /v1/messages)."""
    if anthropic:
        kind = {"server_error": "api_error", "service_unavailable": "overloaded_error"}.get(
            kind, kind
        )
        body: dict = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


class State:
    """What the app holds: the engine once loaded, or why loading failed."""

    def __init__(self):
        self.engine: Engine | None = None
        self.tokenizer = None
        self.cfg = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.drain_s = 10.0
        self.max_body: int | None = None  # bytes; None: from the model's context
        self.on_load_error = None  # called (from the loader) when loading fails
        self.grammars = None  # refmoe.structured.Grammars, built on the first structured request
        self.grammars_lock = threading.Lock()
        self.grammars_error: str | None = None  # why llguidance cannot read the tokenizer

    def body_limit(self) -> int:
        """--max-body-mb, or 16 bytes per token of context (a token id in JSON takes at most
        7, a token of text about 4 characters), at least 1 MiB."""
        if self.max_body is not None:
            return self.max_body
        context = self.engine.context if self.engine is not None else 0
        return max(2**20, 16 * context)


class BodyLimit:
    """ASGI middleware: a request body over the limit is answered 413 as soon as the bytes
    read (or its Content-Length) pass the limit; nothing past it is read or kept."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit  # limit: a callable giving bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limit()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(send, limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._refuse(send, limit)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: the client's disconnect

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"the request body exceeds the limit of "
                    f"{limit:,} bytes (--max-body-mb)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": 413,
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@dataclass(slots=True)
class ToolPlan:
    """A chat request's tools: the format its model writes calls in, the specs its template
    renders, and what the reply is made to start with (a required or named call)."""

    fmt: str
    specs: list[dict]
    opening: str = ""
    name: str | None = None  # the one tool a named tool_choice calls

    def stream(self) -> ToolReader:
        stream = tool_calls.ToolStream(self.fmt, self.opening, self.specs)
        return ToolReader(stream, self.opening)


class ToolReader:
    """ToolStream, except that a call the model wrote badly is not lost: from there on the
    reply is passed on as content, the failure logged."""

    def __init__(self, stream: tool_calls.ToolStream, opening: str):
        self.s, self.opening, self.failed = stream, opening, False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[tool_calls.ToolCall]]:
        if self.failed:
            return self._rest(text), []
        try:
            return self.s.feed(text, final)
        except tool_calls.ToolCallError as e:
            log.warning("a reply's tool call could not be read (%s); passed on as text", e)
            self.failed = True
            return self._rest(text), []

    def _rest(self, text: str) -> str:
        full = self.opening + text
        out, self.s.done = full[self.s.done :], len(full)
        return out


class ReplyReader:
    """A chat reply read as it grows: (new reasoning, new content, newly completed tool calls)
    per feed of the whole text so far. The model's markup decides how: gpt-oss's harmony
    channels (refmoe.harmony), or a <think> block (refmoe.reasoning) and then content with
    tool calls in the template's format (ToolPlan). think: None (no reasoning block) or
    whether the reply starts inside one."""

    def __init__(self, tools: ToolPlan | None, think: bool | None, harmony_: bool = False):
        self.harmony = harmony.HarmonyStream(tools.opening if tools else "") if harmony_ else None
        self.thinking = reasoning.ReasoningStream(think) if think is not None else None
        self.tools = tools.stream() if tools is not None and not harmony_ else None
        self.calls_wanted = tools is not None
        self.content, self.done = "", 0  # the content so far; characters of text read

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[tool_calls.ToolCall]]:
        if self.harmony is not None:
            thought, piece, calls = self.harmony.feed(text, final)
            return thought, piece, calls if self.calls_wanted else []
        thought = ""
        if self.thinking is not None:
            thought, piece = self.thinking.feed(text, final)
        else:
            piece, self.done = text[self.done :], len(text)
        if self.tools is None:
            return thought, piece, []
        self.content += piece
        piece, calls = self.tools.feed(self.content, final)
        return thought, piece, calls


def reply_markup(tok, prompt_text: str) -> tuple[bool | None, str]:
    """(think, markup) of a chat reply to prompt_text: markup "harmony" for gpt-oss's
    template (no <think> block then); else think is None when the template teaches no
    reasoning block, or whether the reply starts inside one."""
    if harmony.is_harmony(tok.chat_template):
        return None, "harmony"
    if reasoning.format_of(tok.chat_template) is None:
        return None, ""
    return reasoning.starts_inside(prompt_text), ""


def plan_tools(tok, specs: list[dict] | None, choice) -> ToolPlan | None:
    """None when no tools are in play (none given, or tool_choice "none"); a 400 naming the
    field when the model's template writes no tool calls or tool_choice is not understood."""
    if choice is not None and not isinstance(choice, (str, dict)):
        raise APIError(400, "tool_choice: a string or an object", param="tool_choice")
    if not specs or choice == "none":
        if isinstance(choice, dict) or choice == "required":
            raise APIError(400, "tool_choice: names a call, but no tools are given", param="tools")
        return None
    fmt = "harmony" if harmony.is_harmony(tok.chat_template) else None
    fmt = fmt or tool_calls.format_of(tok.chat_template)
    if fmt is None:
        raise APIError(
            400,
            "tools: this model's chat template has no tool-call format refmoe can read "
            f"({', '.join(tool_calls.FORMATS)})",
            param="tools",
        )
    names = [t["function"]["name"] for t in specs]
    opening = harmony.opening if fmt == "harmony" else partial(tool_calls.opening, fmt)
    if choice in (None, "auto"):
        return ToolPlan(fmt, specs)
    if choice == "required":
        return ToolPlan(fmt, specs, opening())
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise APIError(
                400, f"tool_choice: no tool named {name!r} in tools", param="tool_choice"
            )
        return ToolPlan(fmt, specs, opening(name), name)
    raise APIError(
        400,
        'tool_choice: "none", "auto", "required" or {"type": "function", "function": {"name"}}',
        param="tool_choice",
    )


def create_app(
    model_dir: str | Path,
    *,
    served_name: str | None = None,
    api_key: str | None = None,
    device: str = "auto",
    drain_s: float = 10.0,
    engine_kwargs: dict | None = None,
    model=None,
    max_body_mb: float | None = None,
) -> FastAPI:
    """The app for one model directory; the model loads in a background thread when the app
    starts (pass `model` to reuse a loaded one)."""
    model_dir = Path(model_dir)
    name = served_name or model_dir.name
    state = State()
    state.drain_s = drain_s
    state.max_body = None if max_body_mb is None else int(max_body_mb * 2**20)
    metrics = Metrics(name)
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def load() -> None:
        from refmoe import models
        from refmoe.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.from_dir(model_dir)
            if model is not None:
                cfg, m = model.cfg, model
            else:
                cfg, m = models.load(model_dir, device=device)
            state.cfg, state.tokenizer = cfg, tokenizer
            state.engine = Engine(
                m, tokenizer, metrics=metrics, model_dir=str(model_dir), **(engine_kwargs or {})
            ).start()
        except Exception as e:  # noqa: BLE001 - reported by /health and every request
            state.error = f"{type(e).__name__}: {e}"
            log.error("the model in %s failed to load: %s", model_dir, state.error)
        finally:
            state.ready.set()
        if state.error and state.on_load_error is not None:
            state.on_load_error()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, daemon=True, name="refmoe-load").start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, drain_s)

    app = FastAPI(title="refmoe", version="0.1.0", lifespan=lifespan)
    app.state.refmoe = state
    app.add_middleware(BodyLimit, limit=state.body_limit)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.kind, e.param, e.headers, _is_anthropic(request))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        anthropic = _is_anthropic(request)
        if first.get("type") == "json_invalid":
            return _error(
                400, f"the body is not valid JSON: {first.get('msg')}", anthropic=anthropic
            )
        return _error(
            400,
            f"{where or 'body'}: {first.get('msg', 'invalid')}",
            param=where,
            anthropic=anthropic,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _error(
            e.status_code,
            str(e.detail),
            "not_found_error" if e.status_code == 404 else "invalid_request_error",
        )

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path not in ("/health", "/metrics", "/docs", "/openapi.json"):
            given = request.headers.get("authorization", "")
            given = given[7:] if given.startswith("Bearer ") else ""
            given = given or request.headers.get("x-api-key", "")  # Anthropic's clients
            # digests of equal length compared in constant time: neither the key's length
            # nor its prefix leaks through timing
            if key_digest is None or not secrets.compare_digest(
                hashlib.sha256(given.encode()).digest(), key_digest
            ):
                return _error(
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                    "authentication_error",
                    anthropic=_is_anthropic(request),
                )
        return await call_next(request)

    def engine() -> Engine:
        if not state.ready.is_set():
            raise APIError(503, "the model is still loading", "service_unavailable")
        if state.engine is None:
            raise APIError(503, f"the model failed to load: {state.error}", "service_unavailable")
        return state.engine

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise APIError(
                404,
                f"model {requested!r} does not exist; this server serves {name!r}",
                "not_found_error",
                "model",
            )

    def tokenizer():
        engine()
        if state.tokenizer is None:
            raise APIError(
                400, f"{name} has no tokenizer (tokenizer.json or tiktoken.model): send token ids"
            )
        return state.tokenizer

    # -- log-probabilities ----------------------------------------------------------------

    def token_text(*ids: int) -> str:
        """Tokens as text ("" without a tokenizer: such clients read token_ids)."""
        return state.tokenizer.decode(list(ids)) if state.tokenizer is not None else ""

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        """Chat's logprobs: each token with its log-probability, its UTF-8 bytes and its
        likeliest alternatives, as OpenAI returns them."""

        def entry(i: int, lp: float | None) -> dict:
            t = token_text(i)
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        content = [
            {**entry(x.token, x.logprob), "top_logprobs": [entry(i, lp) for i, lp in x.top or ()]}
            for x in lps
        ]
        return {"content": content, "refusal": None}

    def text_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
        """The completions API's logprobs: the tokens, their log-probabilities, the likeliest
        alternatives as {token: logprob} (of tokens spelled alike, the likeliest), and each
        token's offset in the text (the first at `offset`). An echoed prompt's first token has
        null for both, as OpenAI gives it."""
        tokens = [token_text(x.token) for x in lps]
        tops: list[dict | None] = []
        for x in lps:
            if x.top is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for i, lp in x.top:  # best first
                top.setdefault(token_text(i), lp)
            tops.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": tops,
            "text_offset": list(accumulate((len(t) for t in tokens), initial=offset))[:-1],
        }

    # -- generation ---------------------------------------------------------------------

    def check_stops(stops: list[str], field: str) -> None:
        if len(stops) > MAX_STOPS or any(len(x) > MAX_STOP_CHARS for x in stops):
            # every stop string is searched for after every token: bound the work one
            # request can put on the decode worker
            raise APIError(
                400,
                f"{field}: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                param=field,
            )

    def submit(eng, prompt, max_tokens, stops, **sampling):
        """The request into the engine, its events into an asyncio queue on this loop;
        sampling: SamplingParams' fields."""
        try:
            params = SamplingParams(**sampling)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            req = eng.submit(prompt, max_tokens, params, sink, state.cfg.eos_token_id or (), stops)
        except QueueFull as e:
            metrics.requests.labels(model=name, outcome="rejected").inc()
            raise APIError(
                429, f"too many requests: {e}", "rate_limit_error", headers={"Retry-After": "1"}
            ) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return req, queue

    async def collect(request: Request, eng, req, queue) -> tuple[list, list, dict, list] | None:
        """A non-streamed request's events until it ends: (text pieces, token ids, the finish
        event, the tokens' TokenLogprobs where asked); None when the client went away (the
        request is cancelled); an error event becomes the APIError it names."""
        text: list[str] = []
        ids: list[int] = []
        lps: list[TokenLogprob] = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        eng.cancel(req.id)
                        metrics.requests.labels(model=name, outcome="cancelled").inc()
                        return None
                    continue
                if ev["type"] == "token":
                    text.append(ev["text"])
                    ids += ev["token_ids"]
                    lps += ev.get("prompt_logprobs", ())  # echo: before the first token's
                    lps += ev.get("logprobs", ())
                elif ev["type"] == "finish":
                    metrics.requests.labels(model=name, outcome="ok").inc()
                    return text, ids, ev, lps
                else:
                    metrics.requests.labels(model=name, outcome="error").inc()
                    status = ev.get("status", 500)
                    raise APIError(
                        status,
                        ev["message"],
                        "service_unavailable" if status == 503 else "server_error",
                    )
        except asyncio.CancelledError:
            eng.cancel(req.id)
            raise

    async def generate(
        request: Request,
        body: _Sampling,
        prompt: list[int],
        chat: bool,
        tools=None,
        think: bool | None = None,
        markup: str = "",
        constraint=None,
        logprobs: int | None = None,
        echo: bool = False,
    ):
        """tools: the request's ToolPlan (chat with tools), whose calls are read off the reply.
        think: None when the model writes no reasoning block, else whether the reply starts
        inside one (refmoe.reasoning); the reasoning is returned as reasoning_content.
        markup: "harmony" for gpt-oss's channels (refmoe.harmony). constraint: the grammar
        the reply is held to (refmoe.structured), or None. logprobs: None, or how many
        alternatives to return with each token's log-probability. echo: the prompt returned
        before the completion (as sent, or its ids as text; with logprobs, its tokens' too)."""
        eng = engine()
        check_model(body.model)
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_tokens = limit or (min(256, eng.context - len(prompt)) if chat else 16)
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        check_stops(stops, "stop")
        req, queue = submit(
            eng,
            prompt,
            max_tokens,
            stops,
            temperature=body.temperature,
            top_k=max(body.top_k, 0),  # -1: off, as vLLM takes it
            top_p=body.top_p,
            seed=body.seed,
            constraint=constraint,
            logprobs=logprobs,
            prompt_logprobs=logprobs if echo else None,
        )
        text_before = None  # the echo, once the engine has taken the prompt's ids as valid
        if echo:
            sent = getattr(body, "prompt", None)
            text_before = sent if isinstance(sent, str) else token_text(*prompt)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(
                    eng,
                    req,
                    queue,
                    rid,
                    created,
                    chat,
                    include_usage,
                    tools,
                    think,
                    markup,
                    text_before,
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        got = await collect(request, eng, req, queue)
        if got is None:
            return Response(status_code=499)  # the client went away
        text, ids, end, lps = got
        finish, usage = end["reason"], end["usage"]
        content = "".join(text)
        if chat:
            reader = ReplyReader(tools, think, markup == "harmony")
            thought, content, calls = reader.feed(content, final=True)
            message: dict = {"role": "assistant", "content": content}
            if thought.strip():
                message["reasoning_content"] = thought.strip()
            if tools is not None:
                message["content"] = content or None
                if calls:
                    message["tool_calls"] = [c.as_openai() for c in calls]
                    finish = "tool_calls"
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": chat_logprobs(lps) if logprobs is not None else None,
            }
        else:
            choice = {
                "index": 0,
                "text": (text_before or "") + content,
                "finish_reason": finish,
                "logprobs": text_logprobs(lps, 0) if logprobs is not None else None,
            }
        choice["token_ids"] = ids
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": name,
            "choices": [choice],
            "usage": usage,
        }

    async def _stream(
        eng,
        req,
        queue,
        rid,
        created,
        chat,
        include_usage,
        tools=None,
        think=None,
        markup="",
        echo=None,  # an echoed prompt's text: sent with the first piece
    ):
        kind = "chat.completion.chunk" if chat else "text_completion"
        reader = ReplyReader(tools, think, markup == "harmony") if chat else None
        so_far, called, first = "", 0, True
        offset = 0  # characters of the completion's tokens so far (its logprobs' text_offset)

        def chunk(choices, usage=None):
            out = {"id": rid, "object": kind, "created": created, "model": name, "choices": choices}
            if include_usage:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        def deltas(thought: str, piece: str, calls, token_ids=None, lps=None) -> list[str]:
            """A chat chunk for the reasoning and content of one feed (with its token ids and
            their logprobs where asked, even when both are held back), then one per completed
            call."""
            nonlocal first, called
            out: list[str] = []
            if thought or piece or token_ids is not None:
                delta: dict = {"content": piece} if piece or not thought else {}
                if thought:
                    delta["reasoning_content"] = thought
                if first:
                    delta["role"], first = "assistant", False
                c = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
                if token_ids is not None:
                    c["token_ids"] = token_ids
                if lps is not None:
                    c["logprobs"] = chat_logprobs(lps)
                out.append(chunk([c]))
            for call in calls:  # each call whole, as soon as it is complete
                d: dict = {"tool_calls": [{"index": called, **call.as_openai()}]}
                if first:
                    d["role"], first = "assistant", False
                out.append(
                    chunk([{"index": 0, "delta": d, "finish_reason": None, "logprobs": None}])
                )
                called += 1
            return out

        try:
            while True:
                ev = await queue.get()
                if ev["type"] == "error":
                    metrics.requests.labels(model=name, outcome="error").inc()
                    status = ev.get("status", 500)
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "error": {
                                    "message": ev["message"],
                                    "param": None,
                                    "code": status,
                                    "type": "service_unavailable"
                                    if status == 503
                                    else "server_error",
                                }
                            }
                        )
                        + "\n\n"
                    )
                    break
                if ev["type"] == "token":
                    lps = ev.get("logprobs")
                    if reader is not None:
                        so_far += ev["text"]
                        feed = reader.feed(so_far)
                        for out in deltas(*feed, token_ids=ev["token_ids"], lps=lps):
                            yield out
                        continue
                    text, echo = (echo or "") + ev["text"], None  # an echo with the first
                    c = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
                    if lps is not None:
                        c["logprobs"] = text_logprobs(
                            [*ev.get("prompt_logprobs", ()), *lps], offset
                        )
                        offset += sum(len(t) for t in c["logprobs"]["tokens"])
                    c["token_ids"] = ev["token_ids"]
                    first = False
                    yield chunk([c])
                else:
                    reason = ev["reason"]
                    if reader is not None:  # what the readers held back
                        for out in deltas(*reader.feed(so_far, final=True)):
                            yield out
                        if called:
                            reason = "tool_calls"
                    c = {"index": 0, "finish_reason": reason, "logprobs": None}
                    c.update({"delta": {}} if chat else {"text": ""})
                    yield chunk([c])
                    if include_usage:
                        yield chunk([], ev["usage"])
                    metrics.requests.labels(model=name, outcome="ok").inc()
                    break
            yield "data: [DONE]\n\n"
        finally:
            if req.finish_reason is None:  # the client went away mid-stream
                eng.cancel(req.id)
                metrics.requests.labels(model=name, outcome="cancelled").inc()

    async def encode(text: str, special: bool, param: str) -> list[int]:
        """Tokenized in a worker thread (a long text never stalls the event loop), refused
        before tokenizing when it cannot fit the context."""
        tok = tokenizer()
        try:
            return await asyncio.to_thread(
                tok.encode_bounded, text, engine().context, special, param
            )
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise APIError(400, "prompt: empty", param="prompt")
            prompt = await encode(body.prompt, True, "prompt")
        else:
            prompt = body.prompt
        return await generate(
            request, body, prompt, chat=False, logprobs=body.logprobs, echo=body.echo
        )

    # -- Anthropic's Messages API -------------------------------------------------------

    STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}

    def _sse(kind: str, data: dict) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        """Anthropic's Messages API over the same engine: the system prompt and the turns
        through the model's chat template; text, tool_use and tool_result content blocks;
        tools and tool_choice; stop reasons end_turn, max_tokens, stop_sequence, tool_use;
        streaming with Anthropic's event sequence."""
        eng = engine()
        check_model(body.model)
        tok = tokenizer()
        turns = [t for m in body.messages for t in m.as_turns()]
        if body.system:
            system = ChatMessage(role="system", content=body.system)
            turns = [system.as_turn(), *turns]
        specs = (
            tool_calls.from_anthropic_tools([t.model_dump() for t in body.tools])
            if body.tools
            else None
        )
        choice = body.tool_choice or {"type": "auto"}
        kinds = {"auto": "auto", "any": "required", "none": "none"}
        if choice.get("type") == "tool":
            oa_choice: str | dict = {"type": "function", "function": {"name": choice.get("name")}}
        elif choice.get("type") in kinds:
            oa_choice = kinds[choice["type"]]
        else:
            raise APIError(400, "tool_choice: type auto, any, tool or none", param="tool_choice")
        tools = plan_tools(tok, specs, oa_choice)
        extra = thinking_variables(body.thinking)
        try:
            text = await asyncio.to_thread(
                tok.apply_chat_template, turns, True, tools.specs if tools else None, extra
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if tools is not None:
            text += tools.opening
        think, markup = reply_markup(tok, text)
        constraint = await asyncio.to_thread(
            output_constraint,
            body.response_format(),
            think,
            markup,
            "output_config.format",
            tools,
        )
        prompt = await encode(text, False, "messages")
        stops = body.stop_sequences or []
        check_stops(stops, "stop_sequences")
        req, queue = submit(
            eng,
            prompt,
            body.max_tokens,
            stops,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            constraint=constraint,
        )
        mid = f"msg_{uuid.uuid4().hex}"
        head = {"id": mid, "type": "message", "role": "assistant", "model": name}

        def stop_of(ev: dict, called: bool = False) -> tuple[str, str | None]:
            if ev.get("stop_sequence"):
                return "stop_sequence", ev["stop_sequence"]
            if called:
                return "tool_use", None
            return STOP_REASONS.get(ev["reason"], "end_turn"), None

        def usage_of(ev: dict | None, out: int) -> dict:
            # Anthropic counts cache reads apart: input_tokens are the ones prefilled
            cached = ev["usage"]["prompt_tokens_details"]["cached_tokens"] if ev else 0
            return {
                "input_tokens": len(prompt) - cached,
                "output_tokens": ev["usage"]["completion_tokens"] if ev else out,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached,
            }

        if body.stream:

            async def events():
                yield _sse(
                    "message_start",
                    {
                        "message": {
                            **head,
                            "content": [],
                            "stop_reason": None,
                            "stop_sequence": None,
                            "usage": usage_of(None, 0),
                        }
                    },
                )
                # a thinking model's reply opens with a thinking block, then the text
                reader = ReplyReader(tools, think, markup == "harmony")
                in_thought = think is not None or markup == "harmony"
                opened = {"type": "thinking", "thinking": ""} if in_thought else None
                yield _sse(
                    "content_block_start",
                    {"index": 0, "content_block": opened or {"type": "text", "text": ""}},
                )
                block, is_text, so_far, called = 0, True, "", 0

                def thoughts(thought: str, after: bool) -> list[str]:
                    """SSE events for reasoning, and the thinking block's end where the
                    content or a call begins (after)."""
                    nonlocal block, in_thought
                    out = []
                    if thought:
                        delta = {"type": "thinking_delta", "thinking": thought}
                        out.append(_sse("content_block_delta", {"index": block, "delta": delta}))
                    if after and in_thought:
                        sig = {"type": "signature_delta", "signature": ""}
                        out.append(_sse("content_block_delta", {"index": block, "delta": sig}))
                        out.append(_sse("content_block_stop", {"index": block}))
                        block, in_thought = block + 1, False
                        start = {"type": "text", "text": ""}
                        out.append(
                            _sse("content_block_start", {"index": block, "content_block": start})
                        )
                    return out

                def pieces(piece, calls):
                    """SSE events for a piece of text and completed calls, each a block."""
                    nonlocal block, is_text, called
                    out = []
                    if piece:
                        if not is_text:  # text after a call: a new text block
                            block, is_text = block + 1, True
                            start = {"type": "text", "text": ""}
                            out.append(
                                _sse(
                                    "content_block_start", {"index": block, "content_block": start}
                                )
                            )
                        delta = {"type": "text_delta", "text": piece}
                        out.append(_sse("content_block_delta", {"index": block, "delta": delta}))
                    for call in calls:
                        use = tool_calls.as_anthropic_block(call)
                        out.append(_sse("content_block_stop", {"index": block}))
                        block, is_text, called = block + 1, False, called + 1
                        start = {**use, "input": {}}
                        out.append(
                            _sse("content_block_start", {"index": block, "content_block": start})
                        )
                        delta = {"type": "input_json_delta", "partial_json": call.arguments}
                        out.append(_sse("content_block_delta", {"index": block, "delta": delta}))
                    return out

                try:
                    while True:
                        ev = await queue.get()
                        if ev["type"] in ("token", "finish"):  # a finish: what was held back
                            so_far += ev["text"] if ev["type"] == "token" else ""
                            thought, piece, calls = reader.feed(so_far, ev["type"] == "finish")
                            for sse in thoughts(thought, bool(piece or calls)):
                                yield sse
                            for sse in pieces(piece, calls):
                                yield sse
                        if ev["type"] == "token":
                            continue
                        if ev["type"] == "finish":
                            reason, seq = stop_of(ev, called > 0)
                            yield _sse("content_block_stop", {"index": block})
                            yield _sse(
                                "message_delta",
                                {
                                    "delta": {"stop_reason": reason, "stop_sequence": seq},
                                    "usage": {"output_tokens": ev["usage"]["completion_tokens"]},
                                },
                            )
                            yield _sse("message_stop", {})
                            metrics.requests.labels(model=name, outcome="ok").inc()
                            break
                        else:
                            metrics.requests.labels(model=name, outcome="error").inc()
                            status = ev.get("status", 500)
                            kind = "overloaded_error" if status == 503 else "api_error"
                            yield _sse("error", {"error": {"type": kind, "message": ev["message"]}})
                            break
                finally:
                    if req.finish_reason is None:  # the client went away mid-stream
                        eng.cancel(req.id)
                        metrics.requests.labels(model=name, outcome="cancelled").inc()

            return StreamingResponse(
                events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        got = await collect(request, eng, req, queue)
        if got is None:
            return Response(status_code=499)  # the client went away
        parts, _, finish, _ = got
        thought, content, calls = ReplyReader(tools, think, markup == "harmony").feed(
            "".join(parts), final=True
        )
        thought = thought.strip()
        reason, seq = stop_of(finish, bool(calls))
        blocks = [{"type": "text", "text": content}] if content or not calls else []
        if thought:  # Anthropic's shape for a model's reasoning (no signature: not Claude's)
            blocks = [{"type": "thinking", "thinking": thought, "signature": ""}] + blocks
        return {
            **head,
            "content": blocks + [tool_calls.as_anthropic_block(c) for c in calls],
            "stop_reason": reason,
            "stop_sequence": seq,
            "usage": usage_of(finish, 0),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        tok = tokenizer()
        limit = engine().context * tok.max_token_chars
        if sum(m.chars for m in body.messages) > limit:
            raise APIError(
                400,
                f"messages: longer than the context of {engine().context:,} tokens can hold",
                param="messages",
            )
        # the specs as the client wrote them (a field it left out is not rendered as null)
        specs = [t.model_dump(exclude_unset=True) for t in body.tools] if body.tools else None
        tools = plan_tools(tok, specs, body.tool_choice)
        extra = dict(body.chat_template_kwargs or {})
        if body.reasoning_effort is not None:
            extra.setdefault("reasoning_effort", body.reasoning_effort)
        try:
            tok.check_template_variables(extra)
        except ValueError as e:
            raise APIError(
                400, f"chat_template_kwargs: {e}", param="chat_template_kwargs"
            ) from None
        try:
            text = await asyncio.to_thread(
                tok.apply_chat_template,
                [m.as_turn() for m in body.messages],
                True,
                tools.specs if tools is not None else None,
                extra,
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if tools is not None:
            text += tools.opening  # a required call: the reply starts inside it
        think, markup = reply_markup(tok, text)
        constraint = await asyncio.to_thread(
            output_constraint, body.response_format, think, markup, "response_format", tools
        )
        prompt = await encode(text, False, "messages")
        return await generate(
            request,
            body,
            prompt,
            chat=True,
            tools=tools,
            think=think,
            markup=markup,
            constraint=constraint,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )

    def output_constraint(
        response_format,
        think: bool | None,
        markup: str,
        field: str = "response_format",
        tools: ToolPlan | None = None,
    ):
        """The grammar a chat reply is held to (refmoe.structured), or None: a required or
        named tool call's (its arguments as the tool's schema says, in the call format of the
        template), else the JSON response_format (OpenAI's shape) asks for. A 400 naming
        `field` for a format or schema that cannot be held to, or for both at once. A reply
        that starts inside a reasoning block is held from the token that closes it."""
        wants_json = response_format is not None and not (
            isinstance(response_format, dict) and response_format.get("type") == "text"
        )
        if tools is not None and tools.opening:
            if wants_json:
                raise APIError(400, f"{field}: not with a required or named tool call", param=field)
            g = grammars()
            if g is None:  # a tokenizer llguidance cannot read: the call is read as written
                return None
            try:
                grammar = g.tool_call(tools.fmt, tools.specs, tools.name)
            except ValueError as e:
                raise APIError(400, str(e), param="tools") from None
            return None if grammar is None else g.constraint(grammar)
        if not wants_json:
            return None
        if markup == "harmony":
            raise APIError(
                400,
                f"{field}: not supported for gpt-oss's harmony channels",
                param=field,
            )
        tok, gate = tokenizer(), None
        if think:
            ids = tok.encode(reasoning.CLOSE, special=False)
            if len(ids) != 1:
                raise APIError(
                    400,
                    f"{field}: the reply starts inside a reasoning block whose end "
                    f"({reasoning.CLOSE}) is not one token for this tokenizer",
                    param=field,
                )
            gate = ids[0]
        g = grammars()
        if g is None:
            raise APIError(
                400,
                f"{field}: this model's tokenizer cannot be read for structured output "
                f"({state.grammars_error})",
                param=field,
            )
        try:
            grammar = g.compile(response_format, field)
        except ValueError as e:
            raise APIError(400, str(e), param=field) from None
        return None if grammar is None else g.constraint(grammar, gate)

    def grammars():
        """The model's refmoe.structured.Grammars, built on the first request that needs it;
        None where llguidance cannot read the tokenizer (the reason in state.grammars_error)."""
        from refmoe import structured

        with state.grammars_lock:
            if state.grammars is None and state.grammars_error is None:
                eos = state.cfg.eos_token_id or []
                eos = [eos] if isinstance(eos, int) else list(eos)
                try:
                    state.grammars = structured.Grammars(tokenizer(), state.cfg.vocab_size, eos)
                except (ValueError, RuntimeError) as e:
                    state.grammars_error = str(e)
                    log.warning("structured output unavailable for this tokenizer: %s", e)
            return state.grammars

    # -- the rest of the API ------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models():
        eng = engine()
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "refmoe",
                    "max_model_len": eng.context,
                }
            ],
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tok = tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if body.messages is not None:
            try:
                text = await asyncio.to_thread(
                    tok.apply_chat_template, [m.as_turn() for m in body.messages]
                )
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            ids = await asyncio.to_thread(tok.encode, text, False)
        else:  # off the event loop; the body cap bounds the text
            ids = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine().context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        tok = tokenizer()
        vocab = state.cfg.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must lie in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens)}

    @app.get("/health")
    async def health():
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        if not state.engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


try:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with the engine's drain first: on SIGTERM / SIGINT (or
        should_exit) the engine stops admitting, lets requests finish for up to drain_s and
        ends the rest with an error event, all while connections are still open; only then
        does uvicorn close them."""

        async def shutdown(self, sockets=None) -> None:
            state: State = self.config.app.state.refmoe  # type: ignore[union-attr]
            if state.engine is not None and state.engine.accepting:
                log.info("draining: up to %.1f s for requests in flight", state.drain_s)
                await asyncio.to_thread(state.engine.shutdown, state.drain_s)
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal it caught once it has shut down, so the process
            # dies by it (-15); after a drain that is a clean exit: status 0
            with super().capture_signals():
                yield
                self._captured_signals.clear()
except ImportError:  # uvicorn is a dependency; only a broken install lands here
    Server = None  # type: ignore[assignment,misc]


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    keep_alive_on_load_error: bool = False,
    **kwargs,
) -> int:
    """Serve until SIGTERM / SIGINT; 0 after a clean drain, 1 when the model failed to load
    (unless keep_alive_on_load_error: then the server stays up answering 503, as before)."""
    parent = logging.getLogger("refmoe")
    if not parent.handlers:  # beside uvicorn's lines, in their format
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        parent.addHandler(handler)
        parent.setLevel(logging.INFO)
    app = create_app(model_dir, **kwargs)
    server = Server(
        uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    )
    state: State = app.state.refmoe
    if not keep_alive_on_load_error:
        state.on_load_error = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if state.error and not keep_alive_on_load_error else 0
