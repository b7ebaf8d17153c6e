"""An answer as an ordered list of blocks (reasoning, text, one block per tool call), the shape
the Anthropic Messages and OpenAI Responses APIs give it (Chat Completions gives one message
instead). Streamed output arrives as `Delta`s; `Blocks` turns them into block steps that each
API's event format writes out, and keeps the finished blocks for a non-streamed body."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .output import Delta, ToolCall

Kind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    kind: Kind
    index: int  # its place in the answer
    text: str = ""  # reasoning or text so far
    call: ToolCall | None = None  # a tool call's block
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # a text block's tokens'
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # for APIs that name items


@dataclass(frozen=True)
class Step:
    """What happened to a block: `start`, `text` (`piece` appended, with its tokens' `logprobs`
    when they were asked for) or `stop`."""

    what: Literal["start", "text", "stop"]
    block: Block
    piece: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)


class Blocks:
    """Deltas into blocks: reasoning or text grows one block until output of another kind
    comes; each tool call is a block of its own, started and stopped at once."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.open: Block | None = None

    def feed(self, delta: Delta) -> Iterator[Step]:
        for kind, text in (("reasoning", delta.reasoning), ("text", delta.content)):
            if not text:
                continue
            if self.open is None or self.open.kind != kind:
                yield from self.close()
                self.open = self._new(kind)
                yield Step("start", self.open)
            self.open.text += text
            scores = delta.logprobs if kind == "text" else []
            self.open.logprobs += scores
            yield Step("text", self.open, text, scores)
        for call in delta.tool_calls:
            yield from self.close()
            block = self._new("tool_call", call)
            yield Step("start", block)
            yield Step("stop", block)

    def close(self) -> Iterator[Step]:
        """Stop the open block, if any (output of another kind comes, or the output ended)."""
        if self.open is not None:
            block, self.open = self.open, None
            yield Step("stop", block)

    def add(self, delta: Delta) -> None:
        """Feed a delta of a non-streamed answer (its steps are not needed)."""
        for _ in self.feed(delta):
            pass

    def calls(self) -> list[ToolCall]:
        return [b.call for b in self.blocks if b.call is not None]

    def joined(self, kind: Kind) -> str:
        return "".join(b.text for b in self.blocks if b.kind == kind)

    def _new(self, kind: Kind, call: ToolCall | None = None) -> Block:
        block = Block(kind, len(self.blocks), call=call)
        self.blocks.append(block)
        return block
