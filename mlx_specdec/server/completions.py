"""`POST /v1/completions`: raw text completion (OpenAI's legacy API), no chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import SpecDecError
from ..generate import encode_prompt
from .context import Server
from .errors import ApiError
from .openai_common import ChunkStream, choice, finish_reason, stats
from .output import Delta, StopFilter
from .schemas import CompletionRequest
from .streaming import stream_response

ENDPOINT = "completions"  # the metrics label


def prompt_ids(tokenizer: Any, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):  # one string in a list
        prompt = prompt[0]
    if not isinstance(prompt, str) and any(t < 0 or t >= len(tokenizer) for t in prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {len(tokenizer)})")
    try:
        ids = encode_prompt(tokenizer, prompt, chat=False)
    except SpecDecError as e:
        raise ApiError(400, str(e)) from None
    if not ids:
        raise ApiError(400, "the prompt encodes to no tokens")
    return ids


class TextChunks(ChunkStream):
    key, empty = "text", ""

    def piece(self, delta: Delta) -> Iterator[str]:
        yield self.chunk(delta.content)


def router(server: Server) -> APIRouter:
    api = APIRouter()
    tokenizer = server.engine.tokenizer

    @api.post("/v1/completions", summary="Text completion (OpenAI, legacy)")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        opts = server.options(req, req.max_tokens)
        ids = prompt_ids(tokenizer, req)
        stops = StopFilter(req.stop_list())
        gen = await server.generate(request, ids, opts, ENDPOINT, stops)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": server.settings.model_name,
        }
        if req.stream:
            return stream_response(gen, TextChunks(base, req.include_usage()))
        text = (await gen.collect()).content
        choices = [choice("text", text, finish_reason(gen))]
        return JSONResponse({**base, "choices": choices, **stats(gen)})

    return api
