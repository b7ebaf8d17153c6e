"""`POST /v1/chat/completions`: messages through the model's chat template, thinking on or off,
tools offered to the template, and the answer split into content, reasoning and tool calls."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .context import Server, guarded
from .conversation import Conversation, start_reply, tool_call_entry
from .errors import ApiError
from .openai_common import ChunkStream, choice, stats
from .output import Delta, StopFilter
from .schemas import ChatCompletionRequest, Message
from .streaming import Generation, stream_response

ENDPOINT = "chat"  # the metrics label


def template_message(m: Message, i: int) -> dict[str, Any]:
    """Message `i` as chat templates expect it: text content, tool-call arguments as objects."""
    out: dict[str, Any] = {"role": m.role}
    if isinstance(m.content, list):
        if any(p.type != "text" for p in m.content):
            raise ApiError(
                400, f"messages[{i}].content: only text parts are supported (no images or audio)"
            )
        out["content"] = "".join(p.text or "" for p in m.content)
    else:
        out["content"] = m.content or ""
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        out["tool_calls"] = [
            tool_call_entry(c.id, c.function.name, c.function.arguments) for c in m.tool_calls
        ]
    return out


def chat_conversation(req: ChatCompletionRequest) -> Conversation:
    """The request as a `Conversation`: `enable_thinking` wins over the template variable of
    the same name; `parallel_tool_calls: false` ends the answer after its first call."""
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", None)
    if req.enable_thinking is not None:
        thinking = req.enable_thinking
    offered = req.tools and req.tool_choice != "none"
    return Conversation(
        [template_message(m, i) for i, m in enumerate(req.messages)],
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if offered else None,
        thinking=None if thinking is None else bool(thinking),
        template_kwargs=kwargs,
        max_tool_calls=1 if req.parallel_tool_calls is False else None,
    )


def content_logprobs(delta: Delta, asked: bool) -> dict[str, Any] | None:
    """A choice's `logprobs`: the answer text's token entries, when they were asked for."""
    return {"content": delta.logprobs} if asked else None


def assistant_message(out: Delta) -> dict[str, Any]:
    """The assistant message of a non-streamed answer."""
    msg: dict[str, Any] = {"role": "assistant", "content": out.content}
    if out.reasoning:
        msg["reasoning_content"] = out.reasoning
    if out.tool_calls:
        msg["tool_calls"] = [c.to_openai() for c in out.tool_calls]
        msg["content"] = out.content or None
    return msg


class ChatChunks(ChunkStream):
    """`chat.completion.chunk`s: the role first, then deltas of content, reasoning and tool calls
    (numbered across the stream)."""

    key, empty = "delta", {}

    def __init__(self, base: dict[str, Any], *args: Any) -> None:
        super().__init__({**base, "object": "chat.completion.chunk"}, *args)
        self.n_calls = 0

    def opening(self) -> Iterator[str]:
        yield self.chunk({"role": "assistant", "content": ""})

    def piece(self, delta: Delta) -> Iterator[str]:
        out: dict[str, Any] = {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            out["tool_calls"] = [
                c.to_openai(self.n_calls + i) for i, c in enumerate(delta.tool_calls)
            ]
            self.n_calls += len(delta.tool_calls)
        yield self.chunk(out, logprobs=content_logprobs(delta, self.top_logprobs is not None))

    def finish_reason(self, gen: Generation) -> str:
        return gen.finish_reason(self.n_calls)


def router(server: Server) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions", summary="Chat completion (OpenAI)")
    @guarded(ENDPOINT)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        opts = server.options(req, req.max_completion_tokens or req.max_tokens)
        stops = StopFilter(req.stop_list())
        gen = await start_reply(server, request, chat_conversation(req), opts, ENDPOINT, stops)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": server.settings.model_name,
        }
        if req.stream:
            top = req.logprob_options().get("top_logprobs")
            return stream_response(gen, ChatChunks(base, req.include_usage(), top))
        out = await gen.collect()
        reason = gen.finish_reason(len(out.tool_calls))
        scores = content_logprobs(out, bool(req.logprobs))
        body = {
            **base,
            "object": "chat.completion",
            "choices": [choice("message", assistant_message(out), reason, scores)],
        }
        return JSONResponse({**body, **stats(gen)})

    return api
