"""Errors as OpenAI-style JSON answers: `ApiError` for the routes to raise, and the handlers that
turn every failure (validation, HTTP, unexpected) into `{"error": {...}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", **headers: str
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers


def error_response(
    status: int, message: str, type_: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(e: RequestValidationError) -> str:
    """What was wrong with the body, in one line (the first five problems)."""
    parts = []
    for err in e.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ())]
        if err.get("type") == "json_invalid":
            return "the body is not valid JSON"
        if loc == ["body"] and err.get("type") in ("model_attributes_type", "missing"):
            return "the body must be a JSON object (send Content-Type: application/json)"
        where = ".".join(p for p in loc if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(e), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {e}", "server_error")
