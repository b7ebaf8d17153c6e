"""The FastAPI app: OpenAI- and Anthropic-compatible routes in front of one `Engine`.

Each route family is a module with a `router(server)`: `chat.py` (chat completions),
`completions.py` (raw completions), `messages.py` (Anthropic Messages) and `responses.py` (OpenAI
Responses), all built on `streaming.py` (a request's run on the engine and the SSE tail). This
module wires them up, with the guard middleware, the error handlers and the service routes
(models, health, metrics). `shutdown.py` runs the app.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import chat, completions, messages, responses
from .context import Server, ServerSettings
from .engine import Engine
from .errors import ApiError, add_error_handlers, error_response

__all__ = ["ServerSettings", "create_app"]
FAMILIES = (chat, completions, messages, responses)
# Metrics labels of the routes that generate (errors before a generation are counted by path).
ENDPOINTS = {
    "/v1/chat/completions": chat.ENDPOINT,
    "/v1/completions": completions.ENDPOINT,
    "/v1/messages": messages.ENDPOINT,
    "/v1/responses": responses.ENDPOINT,
}
log = logging.getLogger("mlx_specdec.server")


def authorized(headers: Mapping[bytes, bytes], key: bytes | None) -> bool:
    """Whether the request carries the API key (any request does when there is none), as
    `Authorization: Bearer KEY` or `x-api-key: KEY`; compared in constant time."""
    if key is None:
        return True
    given = headers.get(b"x-api-key")
    auth = headers.get(b"authorization", b"")
    if given is None and auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given, key)


class _Guard:
    """Pure ASGI middleware: API key on every route but /health, a cap on the request body,
    counted as it arrives so a missing or false Content-Length cannot evade it, and a bare 500
    for anything that escaped the routes (the connection stays usable; the traceback goes to
    the log, not to the client)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, sending)
        except Exception:
            log.exception("request failed")
            if started:
                raise  # too late for an answer: the server closes the connection
            path = scope.get("path", "")
            await error_response(500, "internal error", "server_error", path)(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, path = dict(scope.get("headers") or []), scope["path"]
        if path != "/health" and not authorized(headers, self.key):
            msg = "missing or wrong API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
            denied = error_response(401, msg, "authentication_error", path)
            return await denied(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            too_large = error_response(413, self._too_large(), "invalid_request_error", path)
            return await too_large(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> str:
        return f"request body over the limit of {self.max_body} bytes"


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The app around a loaded (not yet started) engine; the engine runs while the app does."""
    server = Server(engine, settings)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # (a signal drained it already: shutdown.py)
        server.close()

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

    def count(request: Request, e: ApiError) -> None:
        if (endpoint := ENDPOINTS.get(request.url.path)) is not None:
            engine.metrics.count(endpoint, e.outcome)

    add_error_handlers(app, count)
    for family in FAMILIES:
        app.include_router(family.router(server))
    _add_service_routes(app, server)
    if settings.api_key:
        _declare_key(app)
    return app


def _declare_key(app: FastAPI) -> None:
    """Say in the OpenAPI schema that every route but /health takes the key, so that clients
    (and schema-driven fuzzers, which then check it is enforced) know."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        schema = plain()  # (built once, then cached by FastAPI; the changes below are idempotent)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "header": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["security"] = (
                    [] if path == "/health" else [{"bearer": []}, {"header": []}]
                )
        return schema

    app.openapi = openapi


def _add_service_routes(app: FastAPI, server: Server) -> None:
    engine, settings = server.engine, server.settings
    key = settings.api_key.encode() if settings.api_key else None

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

    @app.get("/health", summary="Liveness; needs no API key (without it: status, busy, queued)")
    async def health(request: Request) -> JSONResponse:
        body: dict[str, Any] = {
            "status": "ok" if engine.alive and not engine.closing else "stopping",
            "busy": engine.busy,
            "queued": engine.queued,
        }
        if authorized(dict(request.scope.get("headers") or []), key):
            body |= {
                "model": settings.model_name,
                "mode": engine.config.mode,
                "drafter": engine.config.drafter,
            }
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
