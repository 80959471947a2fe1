"""Reasoning: the part of a reply a thinking model writes before its answer, surfaced apart
from the content (OpenAI-compatible servers' `reasoning_content`, Anthropic's `thinking`
blocks).

The families that think write it between <think> and </think> (DeepSeek-R1 and V3.1 in
thinking mode, GLM-4.5 and later, Kimi-K2-Thinking, MiniMax-M2, Qwen3). Whether a model does is
read off its chat template, as tool-call formats are; many templates open the block themselves
at the end of the prompt (`<think>\\n` after the assistant's header), so the reply starts inside
it and only </think> is written: `starts_inside(prompt_text)` tells.

ReasoningStream takes the decoded reply as it grows and gives back the new reasoning and the
new content, holding back a tail that could be the start of a marker until it is decided. A
reply that never closes its reasoning is all reasoning (a length cut mid-thought).
gpt-oss's harmony channels are not read here.
"""

from __future__ import annotations

from refmoe.tool_calls import partial_marker

OPEN, CLOSE = "<think>", "</think>"


def format_of(template: str | None) -> str | None:
    """ "think" when the chat template teaches <think> ... </think>, else None."""
    return "think" if template and CLOSE in template else None


def starts_inside(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the reply inside an open <think> block."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


class ReasoningStream:
    """Feed the whole decoded reply so far; get (new reasoning, new content)."""

    def __init__(self, inside: bool = False):
        self.state = "think" if inside else "start"  # start -> think -> content
        self.done = 0  # characters of the reply consumed
        self.began = False  # content has begun (its leading whitespace is dropped until then)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        thought, content, i = [], [], self.done
        while i < len(text):
            if self.state == "start":  # leading whitespace, then <think> or the content
                rest = text[i:].lstrip()
                if rest.startswith(OPEN):
                    i, self.state = len(text) - len(rest) + len(OPEN), "think"
                elif not final and OPEN.startswith(rest):  # may still become <think>
                    break
                else:
                    self.state = "content"
            elif self.state == "think":
                at = text.find(CLOSE, i)
                if at < 0:  # hold back a tail that could begin </think>
                    keep = 0 if final else partial_marker(text[i:], (CLOSE,))
                    thought.append(text[i : len(text) - keep])
                    i = len(text) - keep
                    break
                thought.append(text[i:at])
                i, self.state = at + len(CLOSE), "content"
            else:
                piece = text[i:] if self.began else text[i:].lstrip()
                self.began = self.began or bool(piece)
                content.append(piece)
                i = len(text)
        self.done = i
        return "".join(thought), "".join(content)


def split(text: str, inside: bool = False) -> tuple[str, str]:
    """A whole reply: (reasoning without the whitespace around it, content)."""
    thought, content = ReasoningStream(inside).feed(text, final=True)
    return thought.strip(), content
