"""gpt-oss's harmony format: a reply is a run of messages, each
`<|start|>assistant<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]<|message|>BODY` ended
by <|end|> (more follows), <|return|> (the reply's end) or <|call|> (a tool call's end); the
first one's `<|start|>assistant` is in the prompt. The analysis channel is the model's
reasoning, final its answer, and a commentary message to `functions.NAME` a tool call with
BODY its JSON arguments (a commentary message to no one is shown as content).

HarmonyStream takes the decoded reply as it grows (the tokenizer keeps these markers:
refmoe.tokenizer.markup) and gives back the new reasoning, the new content and the tool calls
completed since the last feed; a tail that could be the start of a marker is held back. The
template is recognized by its <|channel|> marker.
"""

from __future__ import annotations

import json
import re

from refmoe.tool_calls import ToolCall, ToolCallError, partial_marker

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = (START, CHANNEL, MESSAGE, "<|constrain|>", *ENDS)


def is_harmony(template: str | None) -> bool:
    return template is not None and CHANNEL in template and MESSAGE in template


def opening(name: str | None = None) -> str:
    """What the reply is made to start with when a call is required (tool_choice "required",
    or one named tool): the header of a commentary message to a function."""
    return f"{CHANNEL}commentary to=functions." + (
        f"{name} <|constrain|>json{MESSAGE}" if name else ""
    )


class HarmonyStream:
    """Feed the whole decoded reply so far; get (new reasoning, new content, new calls).
    prefix: what the reply was made to start with (opening())."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.sent_reasoning = self.sent_content = 0
        self.calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[ToolCall]]:
        text = self.prefix + text
        if not final:  # hold back what could begin a marker
            text = text[: len(text) - partial_marker(text, MARKERS)]
        reasoning, content, calls = parse(text, final)
        out = (
            reasoning[self.sent_reasoning :],
            content[self.sent_content :],
            calls[self.calls :],
        )
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        self.calls = len(calls)
        return out


def parse(text: str, final: bool = True) -> tuple[str, str, list[ToolCall]]:
    """(reasoning, content, completed tool calls) of a reply. A message whose body has not
    ended counts as far as it goes, except a tool call, which counts once ended (or at the
    reply's end when final)."""
    reasoning, content, calls = [], [], []
    for part in text.split(START):
        if not part.strip():
            continue
        header, sep, body = part.partition(MESSAGE)
        if not sep:
            continue  # a header still being written
        ended = any(body.endswith(e) for e in ENDS)
        for end in ENDS:
            body = body.split(end, 1)[0]
        channel = _field(header, CHANNEL)
        to = re.search(r"to=([^\s<]+)", header)
        if to and to.group(1).startswith("functions."):
            if ended or final:
                calls.append(_call(to.group(1).removeprefix("functions."), body))
        elif channel == "analysis":
            reasoning.append(body)
        else:
            content.append(body)
    return "".join(reasoning), "".join(content), calls


def _field(header: str, marker: str) -> str:
    """The word after marker in a header (the channel's name)."""
    _, sep, rest = header.partition(marker)
    return rest.split()[0] if sep and rest.split() else ""


def _call(name: str, body: str) -> ToolCall:
    try:
        args = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"tool {name!r}: its arguments are not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"tool {name!r}: its arguments are not a JSON object")
    return ToolCall(name, json.dumps(args, ensure_ascii=False))
