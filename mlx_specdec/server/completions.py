"""`POST /v1/completions`: raw text completion (OpenAI's legacy API), no chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..generate import encode_prompt
from ..prompts import PromptTooLong, text_size
from .context import Server, guarded
from .errors import ApiError
from .logprobs import legacy
from .openai_common import ChunkStream, choice, stats
from .output import Delta, StopFilter
from .schemas import CompletionRequest
from .streaming import stream_response

ENDPOINT = "completions"  # the metrics label


def prompt_ids(tokenizer: Any, req: CompletionRequest, max_bytes: int | None) -> list[int]:
    """The prompt's token ids: raw text is the client's whole prompt, special tokens included
    (there is no template to break out of). Runs on a prompt worker, off the event loop."""
    prompt = req.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):  # one string in a list
        prompt = prompt[0]
    if isinstance(prompt, str):
        size = text_size(prompt, "prompt")
        if max_bytes is not None and size > max_bytes:
            raise PromptTooLong("prompt", size, max_bytes)
    elif any(t < 0 or t >= len(tokenizer) for t in prompt):
        raise ApiError(400, f"prompt: token ids must be in [0, {len(tokenizer)})")
    ids = encode_prompt(tokenizer, prompt, chat=False)
    if not ids:
        raise ApiError(400, "prompt: encodes to no tokens")
    return ids


class TextChunks(ChunkStream):
    key, empty = "text", ""
    offset = 0  # where the next piece's tokens start in the text

    def piece(self, delta: Delta) -> Iterator[str]:
        scores = None
        if self.top_logprobs is not None:
            scores = legacy(delta.logprobs, self.top_logprobs, self.offset)
            self.offset += sum(len(item["token"]) for item in delta.logprobs)
        yield self.chunk(delta.content, logprobs=scores)


def router(server: Server) -> APIRouter:
    api = APIRouter()
    tokenizer = server.engine.tokenizer

    @api.post("/v1/completions", summary="Text completion (OpenAI, legacy)")
    @guarded(ENDPOINT)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        # The answer continues the prompt: keep its leading space (" 7th" after "The").
        opts = server.options(req, req.max_tokens) | {"leading_space": True}
        ids = await server.prepare(prompt_ids, tokenizer, req, server.max_prompt_bytes)
        stops = StopFilter(req.stop_list())
        gen = await server.generate(request, ids, opts, ENDPOINT, stops)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": server.settings.model_name,
        }
        if req.stream:
            return stream_response(gen, TextChunks(base, req.include_usage(), req.logprobs))
        out = await gen.collect()
        scores = None if req.logprobs is None else legacy(out.logprobs, req.logprobs)
        choices = [choice("text", out.content, gen.finish_reason(), scores)]
        return JSONResponse({**base, "choices": choices, **stats(gen)})

    return api
