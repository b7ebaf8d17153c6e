"""A conversation as the chat template reads it, whichever API it came in by (Chat Completions,
Messages, Responses): the messages as template dicts, the tools offered, thinking on or off. Each
route family converts its request to a `Conversation`; from there, rendering the prompt (message
content stays text: `prompts.render_chat`) and starting the reply are the same steps."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..prompts import render_chat
from .context import Server, ServerSettings
from .errors import ApiError
from .output import OutputSplitter, StopFilter, ToolCall, ToolParser, prompt_opens_thinking
from .streaming import Generation

SEAL = "mlx-specdec:"  # how `seal`ed reasoning begins


@dataclass
class Conversation:
    messages: list[dict[str, Any]]  # {"role", "content": str, ...} as chat templates read them
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, when any are offered
    thinking: bool | None = None  # None: the server's default (`serve --no-thinking`)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tool_calls: int | None = None  # the answer ends after this many calls


def function_tool(name: str, description: str | None, parameters: Any) -> dict[str, Any]:
    """A tool as chat templates (and mlx-lm's tool parsers) expect it: OpenAI's function tool."""
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def tool_call_entry(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    """A call in an assistant message's `tool_calls`, its arguments as an object (Qwen3-style
    templates serialize them); JSON text that does not parse stays text."""
    if isinstance(arguments, str):
        # (the schemas bounded its nesting, so this cannot recurse too deep)
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_turn(content: str, reasoning: str, calls: list[ToolCall]) -> dict[str, Any]:
    """The template message for an answer this server gave (the Responses API stores it)."""
    turn: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        turn["reasoning_content"] = reasoning
    if calls:
        turn["tool_calls"] = [tool_call_entry(c.id, c.name, c.arguments) for c in calls]
    return turn


def call_input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as a JSON object (Anthropic's `input`); anything else the model wrote
    is kept under `arguments`, never lost."""
    try:
        value = json.loads(call.arguments)
    except ValueError:
        value = call.arguments
    return value if isinstance(value, dict) else {"arguments": value}


def seal(text: str) -> str:
    """Reasoning as an opaque string that a client sends back (Anthropic's thinking
    `signature`, the Responses API's `encrypted_content`), so that a client that shows or keeps
    none of the text can still return it. Not secret, only opaque."""
    return SEAL + base64.b64encode(text.encode("utf-8", "replace")).decode()


def unseal(blob: str, where: str) -> str | None:
    """The text `seal` put in `blob`; None for a blob that is not ours."""
    if not blob.startswith(SEAL):
        return None
    try:
        return base64.b64decode(blob[len(SEAL) :], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError(400, f"{where}: damaged") from None


def conversation_prompt(
    tokenizer: Any, conv: Conversation, settings: ServerSettings, max_bytes: int | None
) -> tuple[list[int], bool]:
    """Token ids through the model's chat template, and whether the prompt left the model
    inside a thinking block. Message content stays text (`prompts.render_chat`) unless the
    server allows raw special tokens. Runs on a prompt worker, off the event loop."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions")
    kwargs = dict(conv.template_kwargs)
    thinking = settings.enable_thinking if conv.thinking is None else conv.thinking
    if thinking is not None:
        kwargs["enable_thinking"] = bool(thinking)
    prompt = render_chat(
        tokenizer,
        conv.messages,
        tools=conv.tools,
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


async def count_prompt_tokens(server: Server, conv: Conversation) -> int:
    """The prompt's length in tokens, as a reply to `conv` would be given it."""
    tokenizer = server.engine.tokenizer
    ids, _ = await server.prepare(
        conversation_prompt, tokenizer, conv, server.settings, server.max_prompt_bytes
    )
    return len(ids)


async def start_reply(
    server: Server,
    request: Request,
    conv: Conversation,
    opts: dict[str, Any],
    endpoint: str,
    stops: StopFilter,
) -> Generation:
    """Render the prompt (on a prompt worker) and start the answer, split into content,
    reasoning and tool calls."""
    tokenizer = server.engine.tokenizer
    ids, in_reasoning = await server.prepare(
        conversation_prompt, tokenizer, conv, server.settings, server.max_prompt_bytes
    )
    splitter = OutputSplitter(
        in_reasoning=in_reasoning,
        tools=conv.tools,
        extra_tool_format=model_tool_format(tokenizer) if conv.tools else None,
        max_tool_calls=conv.max_tool_calls,
    )
    return await server.generate(request, ids, opts, endpoint, stops, splitter)
