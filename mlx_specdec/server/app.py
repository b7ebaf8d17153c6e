"""The FastAPI app: OpenAI-compatible routes in front of one `Engine`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import SpecDecError
from ..generate import GenerationChunk, GenerationResult, encode_prompt
from .engine import Engine, EngineBusy, Job
from .output import Delta, OutputSplitter, StopFilter, prompt_opens_thinking
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from .schemas import Message as ChatMessage


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    enable_thinking: bool | None = None  # None: the chat template's default
    default_max_tokens: int = 512
    max_tokens_limit: int = 8192
    max_body_bytes: int = 4 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)  # server defaults: temperature, ...


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", **headers: str
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers


def _error(
    status: int, message: str, type_: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: API key (constant-time) on every route but /health, and a cap on
    the request body, counted as it arrives so a missing or false Content-Length cannot evade
    it."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key and scope["path"] != "/health" and not self._authorized(scope):
            msg = "missing or wrong API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
            return await _error(401, msg, "authentication_error")(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, self._too_large_message())
            return message

        await self.app(scope, counted, send)

    def _too_large_message(self) -> str:
        return f"request body over the limit of {self.max_body} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, self._too_large_message(), "invalid_request_error")(scope, receive, send)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The app around a loaded (not yet started) engine; the engine runs while the app does."""

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(
        title="mlx-specdec",
        description="OpenAI-compatible server with lossless speculative decoding on MLX",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(_Guard, api_key=settings.api_key, max_body=settings.max_body_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    tokenizer = engine.tokenizer
    metrics = engine.metrics
    # Model-specific tool format (mlx-lm detects it from the chat template), besides the two
    # formats every model gets.
    extra_tools = (
        (tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser)
        if getattr(tokenizer, "has_tool_calling", False)
        else None
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            loc = [str(p) for p in err.get("loc", ())]
            if err.get("type") == "json_invalid":
                return _error(400, "the body is not valid JSON", "invalid_request_error")
            if loc == ["body"] and err.get("type") in ("model_attributes_type", "missing"):
                msg = "the body must be a JSON object (send Content-Type: application/json)"
                return _error(400, msg, "invalid_request_error")
            where = ".".join(p for p in loc if p != "body")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return _error(400, "; ".join(parts) or "invalid request", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {e}", "server_error")

    def options(req: SamplingFields, max_tokens: int | None) -> dict[str, Any]:
        n = max_tokens or settings.default_max_tokens
        if n > settings.max_tokens_limit:
            raise ApiError(
                400, f"max_tokens is {n}, over this server's limit of {settings.max_tokens_limit}"
            )
        opts = {"max_new_tokens": n, **settings.sampling}
        for name in ("temperature", "top_p", "top_k", "min_p", "seed"):
            value = getattr(req, name)
            if value is not None:
                opts[name] = value
        return opts

    def submit(ids: list[int], opts: dict[str, Any], endpoint: str) -> Job:
        context = engine.target.max_context
        if context and len(ids) >= context:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens, beyond this model's context of {context} "
                "tokens; shorten the conversation",
            )
        try:
            job = engine.submit(ids, opts)
        except EngineBusy as e:
            metrics.requests.labels(endpoint, "rejected").inc()
            raise ApiError(
                503, str(e), "server_busy", **{"Retry-After": str(e.retry_after)}
            ) from None
        return job

    async def first_chunk(job: Job) -> GenerationChunk | GenerationResult:
        """Wait (in the queue, then through prefill) for the first item, so that errors surface
        before any header is sent."""
        item = await job.out.get()
        if isinstance(item, SpecDecError):
            raise ApiError(400, str(item))
        if isinstance(item, Exception):
            raise ApiError(500, f"generation failed: {item}", "server_error")
        return item

    async def run(
        job: Job, first: Any, stops: StopFilter, splitter: OutputSplitter | None
    ) -> AsyncIterator[Delta | GenerationResult]:
        """Deltas as the engine commits tokens, then the `GenerationResult`. Leaving early (client
        gone) or hitting a stop sequence cancels the job: the engine stops at its next round."""
        item = first
        try:
            while True:
                if isinstance(item, Exception):
                    raise ApiError(500, f"generation failed: {item}", "server_error")
                if isinstance(item, GenerationResult):
                    tail = stops.flush()
                    delta = splitter.feed(tail) if splitter else Delta(content=tail)
                    if splitter:
                        delta.merge(splitter.flush())
                    if delta:
                        yield delta
                    yield item
                    return
                text = stops.feed(item.text)
                if stops.hit:
                    job.cancel.set()
                delta = splitter.feed(text) if splitter else Delta(content=text)
                if delta:
                    yield delta
                item = await job.out.get()
        finally:
            job.cancel.set()

    async def collect(
        request: Request,
        job: Job,
        first: Any,
        stops: StopFilter,
        splitter: OutputSplitter | None,
        endpoint: str,
    ) -> tuple[Delta, GenerationResult]:
        """A whole non-streamed answer; a client that leaves meanwhile cancels the job."""
        out = Delta()
        async with _watch_disconnect(request, job) as gone:
            async for ev in run(job, first, stops, splitter):
                if isinstance(ev, GenerationResult):
                    result = ev
                else:
                    out.merge(ev)
        metrics.requests.labels(endpoint, "disconnected" if gone.is_set() else "ok").inc()
        return out, result

    def x_specdec(result: GenerationResult) -> dict[str, Any]:
        return {
            "mode": result.mode,
            "drafter": engine.config.drafter,
            "mean_accept_len": round(result.mean_accept_len, 3),
            "decode_tokens_per_sec": round(result.tokens_per_sec, 2),
            "prefill_ms": round(result.prefill_seconds * 1000, 2),
            "cached_prompt_tokens": result.cached_tokens,
            "prefix_cache": result.prefix_cache,
            "rounds": len(result.rounds),
        }

    def usage(result: GenerationResult) -> dict[str, Any]:
        n = len(result.tokens)
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": result.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
        }

    def finish_reason(result: GenerationResult, stops: StopFilter, tool_calls: int) -> str:
        if stops.hit:
            return "stop"
        if tool_calls and result.finish_reason == "stop":
            return "tool_calls"
        return result.finish_reason

    def chat_prompt(req: ChatCompletionRequest) -> tuple[list[int], bool]:
        """Token ids through the model's chat template, and whether the prompt left the model
        inside a thinking block."""
        kwargs = dict(req.chat_template_kwargs or {})
        thinking = req.enable_thinking
        if thinking is None:
            thinking = kwargs.get("enable_thinking", settings.enable_thinking)
        kwargs.pop("enable_thinking", None)
        if thinking is not None:
            kwargs["enable_thinking"] = bool(thinking)
        if req.tools and req.tool_choice != "none":
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        messages = [_template_message(m) for m in req.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - templates raise anything on bad conversations
            raise ApiError(400, f"the chat template rejected these messages: {e}") from None
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        return ids, prompt_opens_thinking(text)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI)")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        opts = options(req, req.max_completion_tokens or req.max_tokens)
        ids, in_reasoning = chat_prompt(req)
        tools = [t.model_dump() for t in req.tools] if req.tools else None
        if req.tool_choice == "none":
            tools = None
        splitter = OutputSplitter(
            in_reasoning=in_reasoning, tools=tools, extra_tool_format=extra_tools if tools else None
        )
        stops = StopFilter(req.stop_list())
        job = submit(ids, opts, "chat")
        async with _watch_disconnect(request, job):
            first = await first_chunk(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": settings.model_name}

        if not req.stream:
            out, result = await collect(request, job, first, stops, splitter, "chat")
            message: dict[str, Any] = {"role": "assistant", "content": out.content}
            if out.reasoning:
                message["reasoning_content"] = out.reasoning
            if out.tool_calls:
                message["tool_calls"] = [c.to_openai() for c in out.tool_calls]
                message["content"] = out.content or None
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(result, stops, len(out.tool_calls)),
                "logprobs": None,
            }
            return JSONResponse(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [choice],
                    "usage": usage(result),
                    "x_specdec": x_specdec(result),
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {**base, "object": "chat.completion.chunk", "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            n_calls = 0
            outcome = "disconnected"
            try:
                async for ev in run(job, first, stops, splitter):
                    if isinstance(ev, GenerationResult):
                        result = ev
                        break
                    delta: dict[str, Any] = {}
                    if ev.reasoning:
                        delta["reasoning_content"] = ev.reasoning
                    if ev.content:
                        delta["content"] = ev.content
                    if ev.tool_calls:
                        delta["tool_calls"] = [
                            c.to_openai(n_calls + i) for i, c in enumerate(ev.tool_calls)
                        ]
                        n_calls += len(ev.tool_calls)
                    yield chunk(delta)
                outcome = "ok"
            finally:
                metrics.requests.labels("chat", outcome).inc()
            reason = finish_reason(result, stops, n_calls)
            stats = {"usage": usage(result), "x_specdec": x_specdec(result)}
            if req.include_usage():
                yield chunk({}, reason)
                final = {**base, "object": "chat.completion.chunk", "choices": [], **stats}
                yield f"data: {json.dumps(final)}\n\n"
            else:
                yield chunk({}, reason, **stats)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", summary="Text completion (OpenAI, legacy)")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        opts = options(req, req.max_tokens)
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
        stops = StopFilter(req.stop_list())
        job = submit(ids, opts, "completions")
        async with _watch_disconnect(request, job):
            first = await first_chunk(job)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": settings.model_name,
        }

        def body(text: str, finish: str | None, **extra: Any) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {**base, "choices": [choice], **extra}

        if not req.stream:
            out, result = await collect(request, job, first, stops, None, "completions")
            stats = {"usage": usage(result), "x_specdec": x_specdec(result)}
            return JSONResponse(body(out.content, finish_reason(result, stops, 0), **stats))

        async def events() -> AsyncIterator[str]:
            outcome = "disconnected"
            try:
                async for ev in run(job, first, stops, None):
                    if isinstance(ev, GenerationResult):
                        result = ev
                        break
                    yield f"data: {json.dumps(body(ev.content, None))}\n\n"
                outcome = "ok"
            finally:
                metrics.requests.labels("completions", outcome).inc()
            stats = {"usage": usage(result), "x_specdec": x_specdec(result)}
            reason = finish_reason(result, stops, 0)
            if req.include_usage():
                yield f"data: {json.dumps(body('', reason))}\n\n"
                yield f"data: {json.dumps({**base, 'choices': [], **stats})}\n\n"
            else:
                yield f"data: {json.dumps(body('', reason, **stats))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models", summary="The served model")
    async def models() -> dict[str, Any]:
        entry = {
            "id": settings.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "mlx-specdec",
            "x_specdec": {"mode": engine.config.mode, "drafter": engine.config.drafter},
        }
        return {"object": "list", "data": [entry]}

    @app.get("/health", summary="Liveness; needs no API key")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if engine.alive else "engine stopped",
            "model": settings.model_name,
            "mode": engine.config.mode,
            "drafter": engine.config.drafter,
            "busy": engine.busy,
            "queued": engine.queued,
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, job: Job) -> AsyncIterator[asyncio.Event]:
    """While no response is being sent, a client that goes away cancels its job (the body is
    already read, so the next ASGI message can only be the disconnect). Yields the event that
    tells whether it went."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        job.cancel.set()

    task = asyncio.create_task(watch())
    try:
        yield gone
    finally:
        task.cancel()


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it: text content, tool-call arguments as
    objects (Qwen3-style templates serialize them)."""
    out: dict[str, Any] = {"role": m.role}
    if isinstance(m.content, list):
        if any(p.type != "text" for p in m.content):
            raise ApiError(400, "only text content parts are supported (no images or audio)")
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
            try:
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
