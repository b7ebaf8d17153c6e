"""Turning streamed text into what an OpenAI response carries: stop sequences cut (never emitted,
even when split across rounds), reasoning separated from the answer, tool calls parsed.

Every stage holds back only a tail that could still become a marker, so text streams as soon as
it cannot be part of one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.tool_parsers import gemma4, json_tools

ToolParser = Callable[[str, Any], Any]

# (start marker, end marker, parser): Qwen3/Hermes JSON and Gemma-4, recognised whatever the model.
TOOL_FORMATS: list[tuple[str, str, ToolParser]] = [
    (json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call),
    (gemma4.tool_call_start, gemma4.tool_call_end, gemma4.parse_tool_call),
]
# Thinking blocks: Qwen-style tags and Gemma-4's thought channel.
THINK_FORMATS: list[tuple[str, str]] = [
    ("<think>", "</think>"),
    ("<|channel>thought", "<channel|>"),
]


def split_at_marker(text: str, markers: Sequence[str]) -> tuple[str, str | None, str]:
    """`(safe, marker, rest)`: with a marker in `text`, the text before the earliest one, that
    marker and what follows; else everything that cannot start a marker, None, and the held tail
    (the longest suffix that is a proper prefix of a marker)."""
    best = None
    for m in markers:
        i = text.find(m)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(m) > len(best[1]))):
            best = (i, m)
    if best is not None:
        i, m = best
        return text[:i], m, text[i + len(m) :]
    hold = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), hold, -1):
            if text.endswith(m[:k]):
                hold = k
                break
    return text[: len(text) - hold], None, text[len(text) - hold :]


class StopFilter:
    """Cuts the stream before the first stop sequence; `hit` tells the caller to stop generating,
    `matched` which sequence it was (the Messages API reports it)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        safe, marker, self.held = split_at_marker(self.held + text, self.stops)
        if marker is not None:
            self.hit, self.held, self.matched = True, "", marker
        return safe

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


@dataclass
class Delta:
    """One piece of output: answer text, reasoning text, or a finished tool call; `logprobs`
    holds the OpenAI token entries of the answer text's tokens, when they were asked for."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def merge(self, other: Delta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        self.logprobs += other.logprobs


def _tool_calls(parsed: Any) -> list[ToolCall]:
    """mlx-lm parsers return one `{name, arguments}` dict or a list of them."""
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("a tool call needs a name")
        args = item.get("arguments", {})
        calls.append(ToolCall(item["name"], args if isinstance(args, str) else json.dumps(args)))
    return calls


class OutputSplitter:
    """Routes text into content, reasoning and tool calls.

    `in_reasoning` starts True when the prompt itself opened a thinking block. With `tools`
    None, tool-call markers are ordinary text. A tool block that does not parse (or is cut off
    and still does not parse) is given back as content, so no text is lost. After
    `max_tool_calls` calls (a client that allows one call at a time) the output is over: `done`
    turns True and later text is dropped, so the caller can stop generating.
    """

    def __init__(
        self,
        *,
        in_reasoning: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
        extra_tool_format: tuple[str, str, ToolParser] | None = None,
        max_tool_calls: int | None = None,
    ) -> None:
        self.tools = tools
        self.max_tool_calls = max_tool_calls
        self.tool_formats = ([extra_tool_format] if extra_tool_format else []) + (
            TOOL_FORMATS if tools is not None else []
        )
        self.in_reasoning = in_reasoning
        self.tool: tuple[str, str, ToolParser] | None = None  # the open tool block, if any
        self.held = ""
        self.tool_text = ""
        self.at_start = True  # strip the whitespace that opens each section
        self.n_tool_calls = 0

    def _markers(self) -> list[str]:
        if self.in_reasoning:
            return [e for _, e in THINK_FORMATS]
        if self.tool is not None:
            return [self.tool[1]]
        return [s for s, _ in THINK_FORMATS] + [s for s, _, _ in self.tool_formats]

    @property
    def done(self) -> bool:
        """Whether the allowed tool calls have all been made (the answer ends there)."""
        return self.max_tool_calls is not None and self.n_tool_calls >= self.max_tool_calls

    def feed(self, text: str) -> Delta:
        out = Delta()
        if self.done:
            return out
        self.held += text
        while not self.done:
            safe, marker, rest = split_at_marker(self.held, self._markers())
            self._emit(out, safe)
            self.held = rest
            if marker is None:
                return out
            self._enter(out, marker)
        self.held = ""
        return out

    def _emit(self, out: Delta, text: str) -> None:
        if self.tool is not None:
            self.tool_text += text
            return
        if self.at_start:
            text = text.lstrip()
            self.at_start = not text
        if self.in_reasoning:
            out.reasoning += text
        else:
            out.content += text

    def _enter(self, out: Delta, marker: str) -> None:
        if self.in_reasoning:  # thinking ends
            self.in_reasoning, self.at_start = False, True
        elif self.tool is not None:  # tool block ends
            self._close_tool(out, closed=True)
        elif any(marker == start for start, _ in THINK_FORMATS):
            self.in_reasoning, self.at_start = True, True
        else:
            self.tool = next(f for f in self.tool_formats if f[0] == marker)
            self.tool_text = ""

    def _close_tool(self, out: Delta, *, closed: bool) -> None:
        start, end, parse = self.tool
        self.tool = None
        try:
            calls = _tool_calls(parse(self.tool_text, self.tools))
        except Exception:  # noqa: BLE001 - model text that is not a call stays visible as text
            self._emit(out, start + self.tool_text + (end if closed else ""))
            return
        if self.max_tool_calls is not None:
            calls = calls[: self.max_tool_calls - self.n_tool_calls]
        self.n_tool_calls += len(calls)
        out.tool_calls += calls

    def flush(self) -> Delta:
        """End of generation: release held text; a cut-off tool block is parsed if it can be."""
        out = Delta()
        held, self.held = self.held, ""
        if self.done:
            return out
        if self.tool is not None:
            self.tool_text += held
            self._close_tool(out, closed=False)
        else:
            self._emit(out, held)
        return out


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Templates that pre-open `<think>` leave the model inside the block: only the closer comes."""
    tail = prompt_text.rstrip()
    return any(tail.endswith(start) for start, _ in THINK_FORMATS)
