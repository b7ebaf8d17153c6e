"""`POST /v1/chat/completions`: messages through the model's chat template, thinking on or off,
tools offered to the template, and the answer split into content, reasoning and tool calls."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..prompts import render_chat
from .context import Server, ServerSettings, guarded
from .errors import ApiError
from .openai_common import ChunkStream, choice, finish_reason, stats
from .output import Delta, OutputSplitter, StopFilter, ToolParser, prompt_opens_thinking
from .schemas import ChatCompletionRequest, Message
from .streaming import Generation, stream_response

ENDPOINT = "chat"  # the metrics label


def template_message(m: Message, i: int) -> dict[str, Any]:
    """Message `i` as chat templates expect it: text content, tool-call arguments as objects
    (Qwen3-style templates serialize them)."""
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
        calls = []
        for c in m.tool_calls:
            try:  # (the schema bounded its nesting, so this cannot recurse too deep)
                args: Any = json.loads(c.function.arguments)
            except ValueError:
                args = c.function.arguments
            calls.append(
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": args},
                }
            )
        out["tool_calls"] = calls
    return out


def chat_prompt(
    tokenizer: Any, req: ChatCompletionRequest, settings: ServerSettings, max_bytes: int | None
) -> tuple[list[int], bool]:
    """Token ids through the model's chat template, and whether the prompt left the model
    inside a thinking block. Message content stays text (`prompts.render_chat`) unless the
    server allows raw special tokens. Runs on a prompt worker, off the event loop."""
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = req.enable_thinking
    if thinking is None:
        thinking = kwargs.get("enable_thinking", settings.enable_thinking)
    kwargs.pop("enable_thinking", None)
    if thinking is not None:
        kwargs["enable_thinking"] = bool(thinking)
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions")
    offered = req.tools and req.tool_choice != "none"
    prompt = render_chat(
        tokenizer,
        [template_message(m, i) for i, m in enumerate(req.messages)],
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if offered else None,
        template_kwargs=kwargs,
        raw_special=settings.raw_special_tokens,
        max_bytes=max_bytes,
    )
    return prompt.ids, prompt_opens_thinking(prompt.text)


def model_tool_format(tokenizer: Any) -> tuple[str, str, ToolParser] | None:
    """The model's own tool-call format (mlx-lm detects it from the chat template), besides the
    two formats every model gets."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    return tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser


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

    def __init__(self, base: dict[str, Any], include_usage: bool) -> None:
        super().__init__({**base, "object": "chat.completion.chunk"}, include_usage)
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
        yield self.chunk(out)

    def finish_reason(self, gen: Generation) -> str:
        return finish_reason(gen, self.n_calls)


def router(server: Server) -> APIRouter:
    api = APIRouter()
    tokenizer = server.engine.tokenizer
    extra_tools = model_tool_format(tokenizer)

    @api.post("/v1/chat/completions", summary="Chat completion (OpenAI)")
    @guarded(ENDPOINT)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        opts = server.options(req, req.max_completion_tokens or req.max_tokens)
        ids, in_reasoning = await server.prepare(
            chat_prompt, tokenizer, req, server.settings, server.max_prompt_bytes
        )
        offered = req.tools and req.tool_choice != "none"
        tools = [t.model_dump() for t in req.tools] if offered else None
        splitter = OutputSplitter(
            in_reasoning=in_reasoning, tools=tools, extra_tool_format=extra_tools if tools else None
        )
        stops = StopFilter(req.stop_list())
        gen = await server.generate(request, ids, opts, ENDPOINT, stops, splitter)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": server.settings.model_name,
        }
        if req.stream:
            return stream_response(gen, ChatChunks(base, req.include_usage()))
        out = await gen.collect()
        reason = finish_reason(gen, len(out.tool_calls))
        body = {
            **base,
            "object": "chat.completion",
            "choices": [choice("message", assistant_message(out), reason)],
        }
        return JSONResponse({**body, **stats(gen)})

    return api
