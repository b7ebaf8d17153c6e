"""Errors as each API's JSON answers: `ApiError` for the routes to raise, and the handlers that
turn every expected failure (validation, HTTP) into OpenAI's `{"error": {...}}`, or, under
`/v1/messages`, Anthropic's `{"type": "error", "error": {...}}`. Messages name the field at fault
in the request, never this server's code; unexpected failures are a bare "internal error" (the
guard middleware answers those, see `app.py`)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Error types of our own, beside OpenAI's invalid_request_error / server_error.
BUSY, SHUTDOWN, GONE = "server_busy", "server_shutdown", "client_gone"
# What a union field accepts, said once instead of one complaint per alternative.
UNION_FIELDS = {
    "prompt": "must be a string, a list with one string, or a list of token ids",
    "content": "must be a string or a list of content parts",
    "system": "must be a string or a list of text blocks",
    "input": "must be a string or a list of items",
    "output": "must be a string or a list of content parts",
    "stop": "must be a string or a list of strings",
    "tool_choice": "must be 'none', 'auto' or a function",
}
FRIENDLY = {
    "missing": "is required",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
}


# Anthropic's error types: ours that differ, then by status.
ANTHROPIC_TYPES = {BUSY: "overloaded_error", SHUTDOWN: "overloaded_error"}
ANTHROPIC_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
ANTHROPIC_PREFIX = "/v1/messages"  # the routes that answer Anthropic-style


class ApiError(Exception):
    """An error answer; `param` and `code` are OpenAI's optional fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        **headers: str,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers
        self.param, self.code = param, code

    @property
    def outcome(self) -> str:
        """How the metrics count a request that ended with this error."""
        by_type = {BUSY: "rejected", SHUTDOWN: "shutdown", GONE: "disconnected"}
        return by_type.get(self.type, "error" if self.status >= 500 else "invalid")

    def body(self) -> dict:
        """OpenAI's error object."""
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}

    def anthropic_body(self) -> dict:
        """Anthropic's error object."""
        kind = ANTHROPIC_TYPES.get(self.type) or ANTHROPIC_BY_STATUS.get(self.status)
        kind = kind or ("api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def body_for(self, path: str) -> dict:
        """The error object of the API that `path` belongs to."""
        anthropic = path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")
        return self.anthropic_body() if anthropic else self.body()


def shutting_down(cut: bool = False) -> ApiError:
    what = "the answer was cut short" if cut else "this request was not run"
    return ApiError(503, f"the server is shutting down: {what}", SHUTDOWN, **{"Retry-After": "5"})


def error_response(status: int, message: str, type_: str, path: str = "") -> JSONResponse:
    """An error answer for a request to `path`, in its API's format."""
    return JSONResponse(ApiError(status, message, type_).body_for(path), status)


def _where(loc: tuple) -> tuple[str, bool]:
    """`messages[0].content` from pydantic's location, and whether it went through a union
    (pydantic then adds the alternative's type, e.g. `list[str]`, which we leave out)."""
    path, union = "", False
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.islower():
            if part in ("str", "int", "float", "bool", "none"):
                union = True
                break
            path += f".{part}" if path else part
        else:  # a union alternative's tag (`list[int]`, `NamedToolChoice`, `literal[...]`)
            union = True
            break
    return path, union


def validation_message(e: RequestValidationError) -> str:
    """What was wrong with the body, in one line (at most five problems, one per field)."""
    seen: dict[str, str] = {}
    for err in e.errors():
        kind = err.get("type")
        if kind == "json_invalid":
            return "the body is not valid JSON"
        path, union = _where(tuple(err.get("loc", ())))
        if not path and kind in ("model_attributes_type", "missing", "dict_type"):
            return "the body must be a JSON object (send Content-Type: application/json)"
        if union:
            field = path.rsplit(".", 1)[-1].split("[")[0]
            msg = UNION_FIELDS.get(field, "has the wrong type")
        else:
            msg = FRIENDLY.get(kind) or str(err.get("msg", "is invalid"))
            msg = msg.removeprefix("Value error, ")
        seen.setdefault(path, f"{path}: {msg}" if path else msg)
    return "; ".join(list(seen.values())[:5]) or "invalid request"


def add_error_handlers(app: FastAPI, count: Callable[[Request, ApiError], None]) -> None:
    """Answer errors as the request's API does; `count` is told of each (the metrics)."""

    def answer(request: Request, e: ApiError) -> JSONResponse:
        count(request, e)
        return JSONResponse(e.body_for(request.url.path), e.status, headers=e.headers or None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return answer(request, e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return answer(request, ApiError(400, validation_message(e)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return answer(request, ApiError(e.status_code, str(e.detail), **(e.headers or {})))
