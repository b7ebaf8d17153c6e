"""What each route family is given: the server's settings and its engine, with the two steps
every family takes the same way, sampling options from a request and starting its generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .engine import Engine, EngineBusy
from .errors import ApiError
from .output import OutputSplitter, StopFilter
from .streaming import Generation, first_item, watch_disconnect

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed")


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


@dataclass
class Server:
    engine: Engine
    settings: ServerSettings

    def options(self, req: Any, max_tokens: int | None) -> dict[str, Any]:
        """Generation options: the server's defaults, overridden by the request's sampling
        fields that are set."""
        limit = self.settings.max_tokens_limit
        n = max_tokens or self.settings.default_max_tokens
        if n > limit:
            raise ApiError(400, f"max_tokens is {n}, over this server's limit of {limit}")
        opts = {"max_new_tokens": n, **self.settings.sampling}
        for name in SAMPLING_FIELDS:
            value = getattr(req, name, None)
            if value is not None:
                opts[name] = value
        return opts

    async def generate(
        self,
        request: Request,
        ids: list[int],
        opts: dict[str, Any],
        endpoint: str,
        stops: StopFilter,
        splitter: OutputSplitter | None = None,
    ) -> Generation:
        """Queue the prompt and wait for its first output, so that a full queue, a prompt over
        the context or a failed prefill is an error answer rather than a broken stream."""
        context = self.engine.target.max_context
        if context and len(ids) >= context:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens, beyond this model's context of {context} "
                "tokens; shorten the conversation",
            )
        try:
            job = self.engine.submit(ids, opts)
        except EngineBusy as e:
            self.engine.metrics.requests.labels(endpoint, "rejected").inc()
            raise ApiError(
                503, str(e), "server_busy", **{"Retry-After": str(e.retry_after)}
            ) from None
        async with watch_disconnect(request, job):
            first = await first_item(job)
        return Generation(self.engine, request, job, first, stops, splitter, endpoint)
