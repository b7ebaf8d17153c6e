"""`POST /v1/responses` (OpenAI's Responses API).

`input` (a string, or items: messages, `function_call`, `function_call_output`, `reasoning`)
and `instructions` become a `Conversation`; the answer comes back as output items: `reasoning`,
`message`, one `function_call` per call. Streamed, it is the API's typed events
(`response.created`, `response.output_item.added`, `response.output_text.delta`, ...,
`response.completed`), numbered by `sequence_number`.

`previous_response_id` continues a stored conversation: each response made with `store` (the
default) keeps its conversation in a bounded store, least recently used out first (`serve
--response-store N`). The follow-up's prompt then starts with the tokens of that conversation,
which the prefix cache still holds, so only the new turn is prefilled.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .blocks import Block, Blocks, Step
from .context import Server, guarded
from .conversation import (
    Conversation,
    assistant_turn,
    function_tool,
    seal,
    start_reply,
    tool_call_entry,
    unseal,
)
from .errors import ApiError
from .output import Delta, StopFilter
from .schemas_responses import ENCRYPTED_REASONING, InputItem, InputPart, ResponsesRequest
from .streaming import Generation, sse, stream_response

ENDPOINT = "responses"  # the metrics label
ITEMS_READ = "message, function_call, function_call_output and reasoning items are supported"
TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")
Messages = list[dict[str, Any]]


class ResponseStore:
    """Conversations of past responses by id (without their instructions, which a follow-up
    does not inherit); beyond `size`, the least recently used go first. A conversation shares
    its message dicts with the one it continued, so a long chain holds each turn once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Messages] = OrderedDict()

    def get(self, response_id: str) -> Messages | None:
        messages = self._items.get(response_id)
        if messages is not None:
            self._items.move_to_end(response_id)
        return messages

    def put(self, response_id: str, messages: Messages) -> None:
        if self.size < 1:
            return
        self._items[response_id] = messages
        while len(self._items) > self.size:
            self._items.popitem(last=False)


# ------------------------------------------------------------------------------ the request
def input_messages(req: ResponsesRequest) -> Messages:
    """`input` as template messages; consecutive assistant items (reasoning, message, calls)
    make one assistant turn."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    out: Messages = []
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.type or ("message" if item.role else None)
        if kind == "message":
            add_message(out, item, where)
        elif kind == "function_call":
            if not (item.call_id and item.name):
                raise ApiError(400, f"{where}: a function_call needs a call_id and a name")
            turn = _assistant(out, lambda t: True)
            call = tool_call_entry(item.call_id, item.name, item.arguments or "{}")
            turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not item.call_id:
                raise ApiError(400, f"{where}.call_id: is required")
            result = parts_text(item.output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": result})
        elif kind == "reasoning":
            turn = _assistant(out, lambda t: not (t["content"] or "tool_calls" in t))
            turn["reasoning_content"] = turn.get("reasoning_content", "") + reasoning_text(
                item, where
            )
        else:
            raise ApiError(400, f"{where}.type: {kind!r} items are not supported; {ITEMS_READ}")
    return out


def _assistant(out: Messages, open_: Any) -> dict[str, Any]:
    """The assistant turn an item joins: the last message if it is one and `open_(it)`, else a
    new one."""
    if out and out[-1]["role"] == "assistant" and open_(out[-1]):
        return out[-1]
    out.append({"role": "assistant", "content": ""})
    return out[-1]


def add_message(out: Messages, item: InputItem, where: str) -> None:
    if item.role is None:
        raise ApiError(400, f"{where}.role: is required")
    text = parts_text(item.content, f"{where}.content")
    if item.role == "assistant":
        turn = _assistant(out, lambda t: not (t["content"] or "tool_calls" in t))
        turn["content"] = text
    else:  # developer messages are the system prompt of newer models: templates know system
        out.append({"role": "system" if item.role == "developer" else item.role, "content": text})


def parts_text(content: str | list[InputPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type == "refusal":
            texts.append(part.refusal or "")
        elif part.type in TEXT_PARTS:
            texts.append(part.text or "")
        else:
            raise ApiError(400, f"{where}[{j}]: {part.type!r} parts are not supported (text only)")
    return "".join(texts)


def reasoning_text(item: InputItem, where: str) -> str:
    """A reasoning item's text: its content, else our `encrypted_content`, else its summary."""
    if item.content:
        return parts_text(item.content, f"{where}.content")
    if item.encrypted_content:
        text = unseal(item.encrypted_content, f"{where}.encrypted_content")
        if text is None:
            raise ApiError(400, f"{where}.encrypted_content: not made by this server")
        return text
    return parts_text(item.summary, f"{where}.summary")


def responses_conversation(
    req: ResponsesRequest, history: Messages
) -> tuple[Conversation, Messages]:
    """The request as a `Conversation`, and the conversation to store (without instructions)."""
    turns = history + input_messages(req)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    offered = req.tools and req.tool_choice != "none"
    tools = [function_tool(t.name, t.description, t.parameters) for t in req.tools or []]
    calls = 1 if req.parallel_tool_calls is False else req.max_tool_calls
    conv = Conversation(
        system + turns, tools if offered else None, req.thinking(), max_tool_calls=calls
    )
    return conv, turns


# ------------------------------------------------------------------------------ the answer
class Answer:
    """Output items and the response object, for one request."""

    def __init__(self, req: ResponsesRequest, server: Server) -> None:
        self.req, self.server = req, server
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.encrypted = ENCRYPTED_REASONING in (req.include or [])

    def item(self, block: Block, status: str = "completed", started: bool = False) -> dict:
        """A block as an output item; `started`: as `output_item.added` opens it (empty)."""
        if block.kind == "tool_call":
            call = block.call
            return {
                "type": "function_call",
                "id": f"fc_{block.id}",
                "call_id": call.id,
                "name": call.name,
                "arguments": "" if started else call.arguments,
                "status": status,
            }
        if block.kind == "reasoning":
            item = {"type": "reasoning", "id": f"rs_{block.id}", "summary": [], "status": status}
            if not started:
                item["content"] = [self.part(block)]
                if self.encrypted:
                    item["encrypted_content"] = seal(block.text)
            return item
        content = [] if started else [self.part(block)]
        return {
            "type": "message",
            "id": f"msg_{block.id}",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def part(block: Block, started: bool = False) -> dict[str, Any]:
        text = "" if started else block.text
        if block.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        scores = [] if started else block.logprobs
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": scores}

    def body(self, status: str, output: list[dict]) -> dict[str, Any]:
        """The response object (what the request set, echoed), without usage."""
        req, settings = self.req, self.server.settings

        def sampled(name: str) -> Any:  # the request's value, else the server's default
            value = getattr(req, name)
            return settings.sampling.get(name) if value is None else value

        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "model": settings.model_name,
            "output": output,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls,
            "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump() if req.reasoning else {"effort": None},
            "store": req.store,
            "temperature": sampled("temperature"),
            "top_p": sampled("top_p"),
            "text": {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled",
            "usage": None,
        }

    def usage(self, gen: Generation, reasoning: str) -> dict[str, Any]:
        r, n = gen.result, gen.output_tokens
        # Re-tokenized: the engine does not tell reasoning tokens apart.
        encode = self.server.engine.tokenizer.encode
        thought = len(encode(reasoning, add_special_tokens=False)) if reasoning else 0
        return {
            "input_tokens": r.prompt_tokens,
            "input_tokens_details": {"cached_tokens": r.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": min(thought, n)},
            "total_tokens": r.prompt_tokens + n,
        }

    def final(self, gen: Generation, blocks: Blocks) -> dict[str, Any]:
        """The finished response object, with usage and our stats."""
        status = "incomplete" if gen.finish_reason() == "length" else "completed"
        last = len(blocks.blocks) - 1
        output = [
            self.item(
                b, "incomplete" if status == "incomplete" and b.index == last else "completed"
            )
            for b in blocks.blocks
        ]
        usage = self.usage(gen, blocks.joined("reasoning"))
        return {**self.body(status, output), "usage": usage, "x_specdec": gen.x_specdec()}


class ResponseEvents:
    """The Responses API's typed event stream (an `EventFormat`). `done` is called with the
    finished response (to store it)."""

    def __init__(self, answer: Answer, done: Any) -> None:
        self.answer, self.done, self.blocks, self.seq = answer, done, Blocks(), 0

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **fields}, kind)

    def opening(self) -> Iterator[str]:
        shell = self.answer.body("in_progress", [])
        yield self.event("response.created", response=shell)
        yield self.event("response.in_progress", response=shell)

    def piece(self, delta: Delta) -> Iterator[str]:
        for step in self.blocks.feed(delta):
            yield from self._step(step)

    def _step(self, step: Step, status: str = "completed") -> Iterator[str]:
        block = step.block
        where = {
            "item_id": self.answer.item(block, started=True)["id"],
            "output_index": block.index,
        }
        if step.what == "start":
            yield from self._start(block, where)
        elif step.what == "text":
            kind, scores = self._text_kind(block, step.logprobs)
            yield self.event(
                f"response.{kind}.delta", content_index=0, delta=step.piece, **scores, **where
            )
        else:
            yield from self._stop(block, where, status)

    @staticmethod
    def _text_kind(block: Block, logprobs: list) -> tuple[str, dict[str, Any]]:
        """The event family of a text block, and the `logprobs` its events carry (answer text
        only)."""
        if block.kind == "reasoning":
            return "reasoning_text", {}
        return "output_text", {"logprobs": logprobs}

    def _start(self, block: Block, where: dict[str, Any]) -> Iterator[str]:
        a, at = self.answer, {"output_index": block.index}
        yield self.event(
            "response.output_item.added", item=a.item(block, "in_progress", True), **at
        )
        if block.call is not None:  # a call arrives whole: its arguments in one delta
            args = block.call.arguments
            yield self.event("response.function_call_arguments.delta", delta=args, **where)
        else:
            yield self.event(
                "response.content_part.added",
                content_index=0,
                part=a.part(block, started=True),
                **where,
            )

    def _stop(self, block: Block, where: dict[str, Any], status: str) -> Iterator[str]:
        a = self.answer
        if block.call is not None:
            yield self.event(
                "response.function_call_arguments.done",
                name=block.call.name,
                arguments=block.call.arguments,
                **where,
            )
        else:
            kind, scores = self._text_kind(block, block.logprobs)
            yield self.event(
                f"response.{kind}.done", content_index=0, text=block.text, **scores, **where
            )
            yield self.event(
                "response.content_part.done", content_index=0, part=a.part(block), **where
            )
        yield self.event(
            "response.output_item.done", item=a.item(block, status), output_index=block.index
        )

    def closing(self, gen: Generation) -> Iterator[str]:
        incomplete = gen.finish_reason() == "length"
        for step in self.blocks.close():
            yield from self._step(step, "incomplete" if incomplete else "completed")
        body = self.answer.final(gen, self.blocks)
        self.done(self.blocks)
        kind = "response.incomplete" if incomplete else "response.completed"
        yield self.event(kind, response=body)

    def error(self, e: ApiError) -> Iterator[str]:
        body = self.answer.body("failed", [self.answer.item(b) for b in self.blocks.blocks])
        body["error"] = {"code": e.code or "server_error", "message": e.message}
        yield self.event("response.failed", response=body)


# ------------------------------------------------------------------------------ the route
def router(server: Server) -> APIRouter:
    api = APIRouter()
    store = ResponseStore(server.settings.response_store)

    def history(req: ResponsesRequest) -> Messages:
        if req.previous_response_id is None:
            return []
        messages = store.get(req.previous_response_id)
        if messages is None:
            raise ApiError(
                404,
                f"previous_response_id: no response {req.previous_response_id!r} is stored "
                "here (made with store: false, dropped from the server's store of the last "
                f"{store.size} responses, or never made)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return messages

    @api.post("/v1/responses", summary="Response (OpenAI Responses API)")
    @guarded(ENDPOINT)
    async def responses(req: ResponsesRequest, request: Request) -> Response:
        opts = server.options(req, req.max_output_tokens, "max_output_tokens")
        conv, turns = responses_conversation(req, history(req))
        gen = await start_reply(server, request, conv, opts, ENDPOINT, StopFilter([]))
        answer = Answer(req, server)

        def remember(blocks: Blocks) -> None:
            if req.store:
                reply = assistant_turn(
                    blocks.joined("text"), blocks.joined("reasoning"), blocks.calls()
                )
                store.put(answer.id, turns + [reply])

        if req.stream:
            return stream_response(gen, ResponseEvents(answer, remember))
        blocks = Blocks()
        await gen.collect(blocks.add)
        remember(blocks)
        return JSONResponse(answer.final(gen, blocks))

    return api
