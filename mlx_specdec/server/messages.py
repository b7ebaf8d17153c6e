"""`POST /v1/messages` (Anthropic's Messages API) and `POST /v1/messages/count_tokens`.

The request becomes a `Conversation` (system prompt, turns, `tool_use` / `tool_result` blocks as
tool calls and tool messages, `thinking` blocks as reasoning), the answer comes back as content
blocks: `thinking`, `text`, `tool_use`. Streamed, it is Anthropic's event sequence:
`message_start`, then per block `content_block_start` / `_delta` / `_stop`, then `message_delta`
(stop reason, usage) and `message_stop`. Errors under these routes are Anthropic's error objects
(`errors.py`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .blocks import Block, Blocks, Step
from .context import Server, guarded
from .conversation import (
    Conversation,
    call_input,
    count_prompt_tokens,
    function_tool,
    seal,
    start_reply,
    tool_call_entry,
    unseal,
)
from .errors import ApiError
from .output import Delta, StopFilter
from .schemas_anthropic import ContentBlock, InputMessage, MessagesPrompt, MessagesRequest
from .streaming import Generation, sse, stream_response

ENDPOINT = "messages"  # the metrics label
BLOCKS_READ = "text, thinking, tool_use and tool_result blocks are supported"
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


# ------------------------------------------------------------------------------ the request
def anthropic_conversation(req: MessagesPrompt) -> Conversation:
    """The request as a `Conversation`. A `thinking` config turns thinking on (`enabled`,
    `adaptive`, `between_tools`) or off; without one the server's default holds."""
    if req.messages[-1].role != "user":
        raise ApiError(
            400,
            "messages: the last message must be the user's (continuing a given assistant "
            "message, 'prefill', is not supported)",
        )
    messages = [{"role": "system", "content": system_text(req.system)}] if req.system else []
    for i, m in enumerate(req.messages):
        messages += user_turn(m, i) if m.role == "user" else [assistant_turn(m, i)]
    choice = req.tool_choice
    offered = req.tools and not (choice and choice.type == "none")
    tools = [function_tool(t.name, t.description, t.input_schema) for t in req.tools or []]
    return Conversation(
        messages,
        tools=tools if offered else None,
        thinking=None if req.thinking is None else req.thinking.type != "disabled",
        max_tool_calls=1 if choice and choice.disable_parallel_tool_use else None,
    )


def system_text(system: str | list) -> str:
    return system if isinstance(system, str) else "\n".join(b.text for b in system)


def _refuse(where: str, block: ContentBlock, role: str) -> ApiError:
    return ApiError(
        400, f"{where}: {block.type!r} blocks are not read in a {role} message; {BLOCKS_READ}"
    )


def user_turn(m: InputMessage, i: int) -> list[dict[str, Any]]:
    """A user message as template messages: its text, and one tool message per `tool_result`
    (in their order)."""
    if isinstance(m.content, str):
        return [{"role": "user", "content": m.content}]
    out: list[dict[str, Any]] = []
    text: list[str] = []
    for j, block in enumerate(m.content):
        where = f"messages[{i}].content[{j}]"
        if block.type == "text":
            text.append(block.text or "")
        elif block.type == "tool_result":
            if text:
                out.append({"role": "user", "content": "\n".join(text)})
                text = []
            if not block.tool_use_id:
                raise ApiError(400, f"{where}.tool_use_id: is required")
            result = tool_result_text(block.content, f"{where}.content")
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        else:
            raise _refuse(where, block, "user")
    if text or not out:
        out.append({"role": "user", "content": "\n".join(text)})
    return out


def tool_result_text(content: str | list | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if part.type != "text":
            raise ApiError(400, f"{where}[{j}]: only text is supported in a tool result")
    return "\n".join(part.text or "" for part in content)


def assistant_turn(m: InputMessage, i: int) -> dict[str, Any]:
    """An assistant message as one template message: text as content, thinking as reasoning,
    `tool_use` blocks as tool calls."""
    if isinstance(m.content, str):
        return {"role": "assistant", "content": m.content}
    text, reasoning, calls = [], [], []
    for j, block in enumerate(m.content):
        where = f"messages[{i}].content[{j}]"
        if block.type == "text":
            text.append(block.text or "")
        elif block.type == "thinking":  # (text omitted: the signature carries it)
            sealed = unseal(block.signature or "", f"{where}.signature")
            reasoning.append(block.thinking or sealed or "")
        elif block.type == "tool_use":
            if not block.name:
                raise ApiError(400, f"{where}.name: is required")
            calls.append(tool_call_entry(block.id, block.name, block.input or {}))
        else:
            raise _refuse(where, block, "assistant")
    turn: dict[str, Any] = {"role": "assistant", "content": "\n".join(text)}
    if reasoning:
        turn["reasoning_content"] = "\n".join(reasoning)
    if calls:
        turn["tool_calls"] = calls
    return turn


# ------------------------------------------------------------------------------ the answer
def content_block(block: Block, started: bool = False, omit: bool = False) -> dict[str, Any]:
    """A block as Anthropic writes it; `started`: as `content_block_start` opens it (empty);
    `omit`: thinking without its text (the signature carries it: `seal`)."""
    if block.kind == "reasoning":
        text = "" if started or omit else block.text
        sealed = "" if started else seal(block.text)
        return {"type": "thinking", "thinking": text, "signature": sealed}
    if block.kind == "text":
        return {"type": "text", "text": "" if started else block.text}
    call = block.call
    return {
        "type": "tool_use",
        "id": call.id,
        "name": call.name,
        "input": {} if started else call_input(call),
    }


def stop_reason(gen: Generation, n_calls: int) -> str:
    """`end_turn`, `stop_sequence`, `max_tokens` or `tool_use`."""
    reason = gen.finish_reason(n_calls)
    if reason == "stop":
        return "stop_sequence" if gen.stopped else "end_turn"
    return STOP_REASONS.get(reason, "end_turn")


def usage(gen: Generation, output_tokens: int) -> dict[str, Any]:
    """Anthropic counts the prompt tokens read from the cache apart from `input_tokens`."""
    cached = gen.cached_tokens
    return {
        "input_tokens": gen.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output_tokens,
    }


def ending(gen: Generation, blocks: Blocks) -> dict[str, Any]:
    """What an answer ends with: its stop reason, the stop sequence met, usage, our stats."""
    return {
        "stop_reason": stop_reason(gen, len(blocks.calls())),
        "stop_sequence": gen.stops.matched,
        "usage": usage(gen, gen.output_tokens),
        "x_specdec": gen.x_specdec(),
    }


def _event(kind: str, **fields: Any) -> str:
    return sse({"type": kind, **fields}, kind)


class MessageEvents:
    """Anthropic's event stream (an `EventFormat`)."""

    def __init__(self, base: dict[str, Any], gen: Generation, omit_thinking: bool) -> None:
        self.base, self.gen, self.blocks = base, gen, Blocks()
        self.omit = omit_thinking

    def opening(self) -> Iterator[str]:
        message = {**self.base, "content": [], "stop_reason": None, "stop_sequence": None}
        yield _event("message_start", message={**message, "usage": usage(self.gen, 0)})

    def piece(self, delta: Delta) -> Iterator[str]:
        for step in self.blocks.feed(delta):
            yield from self._step(step)

    def _step(self, step: Step) -> Iterator[str]:
        block, index = step.block, step.block.index
        if step.what == "start":
            yield _event(
                "content_block_start", index=index, content_block=content_block(block, started=True)
            )
            if block.call is not None:  # a call arrives whole: its input in one delta
                partial = json.dumps(call_input(block.call))
                delta = {"type": "input_json_delta", "partial_json": partial}
                yield _event("content_block_delta", index=index, delta=delta)
        elif step.what == "text":
            if block.kind == "reasoning" and self.omit:
                return
            kind = "thinking" if block.kind == "reasoning" else "text"
            delta = {"type": f"{kind}_delta", kind: step.piece}
            yield _event("content_block_delta", index=index, delta=delta)
        else:
            if block.kind == "reasoning":
                delta = {"type": "signature_delta", "signature": seal(block.text)}
                yield _event("content_block_delta", index=index, delta=delta)
            yield _event("content_block_stop", index=index)

    def closing(self, gen: Generation) -> Iterator[str]:
        for step in self.blocks.close():
            yield from self._step(step)
        end = ending(gen, self.blocks)
        delta = {"stop_reason": end["stop_reason"], "stop_sequence": end["stop_sequence"]}
        yield _event("message_delta", delta=delta, usage=end["usage"], x_specdec=end["x_specdec"])
        yield _event("message_stop")

    def error(self, e: ApiError) -> Iterator[str]:
        yield sse(e.anthropic_body(), "error")


# ------------------------------------------------------------------------------ the routes
def router(server: Server) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/messages", summary="Message (Anthropic Messages API)")
    @guarded(ENDPOINT)
    async def messages(req: MessagesRequest, request: Request) -> Response:
        opts = server.options(req, req.max_tokens)
        stops = StopFilter(req.stop_sequences or [])
        conv = anthropic_conversation(req)
        gen = await start_reply(server, request, conv, opts, ENDPOINT, stops)
        base = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": server.settings.model_name,
        }
        if req.stream:
            return stream_response(gen, MessageEvents(base, gen, req.thinking_omitted()))
        blocks = Blocks()
        await gen.collect(blocks.add)
        content = [content_block(b, omit=req.thinking_omitted()) for b in blocks.blocks]
        return JSONResponse({**base, "content": content, **ending(gen, blocks)})

    @api.post("/v1/messages/count_tokens", summary="Count a Messages prompt's tokens (Anthropic)")
    @guarded("count_tokens")
    async def count_tokens(req: MessagesPrompt) -> dict[str, int]:
        return {"input_tokens": await count_prompt_tokens(server, anthropic_conversation(req))}

    return api
