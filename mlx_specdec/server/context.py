"""What each route family is given: the server's settings and its engine, with the steps every
family takes the same way: preparing its prompt off the event loop, sampling options from a
request, and starting its generation."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from ..errors import SpecDecError
from ..prompts import prompt_byte_limit
from .engine import Engine, EngineBusy, EngineClosed
from .errors import BUSY, ApiError, shutting_down
from .output import OutputSplitter, StopFilter
from .streaming import Generation, first_item, watch_disconnect

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed")
PROMPT_WORKERS = 2  # threads that render and tokenize prompts, beside the engine's
T = TypeVar("T")
log = logging.getLogger("mlx_specdec.server")


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
    raw_special_tokens: bool = False  # message content may carry the template's own tokens
    response_store: int = 256  # responses kept for `previous_response_id` (0: none)


@dataclass
class Server:
    engine: Engine
    settings: ServerSettings

    def __post_init__(self) -> None:
        self._workers = ThreadPoolExecutor(PROMPT_WORKERS, thread_name_prefix="specdec-prompt")
        self.max_prompt_bytes = prompt_byte_limit(
            self.engine.tokenizer, self.engine.target.max_context
        )

    async def prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a prompt worker: rendering and tokenizing a long prompt takes seconds
        that the event loop (every other client) must not wait. `SpecDecError`s become 400s."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._workers, functools.partial(fn, *args))
        except SpecDecError as e:
            raise ApiError(400, str(e)) from None

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def options(
        self, req: Any, max_tokens: int | None, field: str = "max_tokens"
    ) -> dict[str, Any]:
        """Generation options: the server's defaults, overridden by the request's sampling
        fields that are set, its penalties and the log-probabilities it asks for. `field` names
        the request's token limit in errors."""
        limit = self.settings.max_tokens_limit
        n = max_tokens or self.settings.default_max_tokens
        if n > limit:
            raise ApiError(400, f"{field} is {n}, over this server's limit of {limit}")
        opts = {"max_new_tokens": n, **self.settings.sampling}
        for name in SAMPLING_FIELDS:
            value = getattr(req, name, None)
            if value is not None:
                opts[name] = value
        vocab = self.engine.target.vocab_size
        if opts.get("top_k", 0) >= vocab:
            opts["top_k"] = 0  # keeps every token anyway; mlx-lm's filter refuses such a k
        opts |= req.penalty_options() | req.logprob_options()
        if any(t >= vocab for t in opts.get("logit_bias", ())):
            raise ApiError(400, f"logit_bias: token ids must be below {vocab}")
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
            raise ApiError(503, str(e), BUSY, **{"Retry-After": str(e.retry_after)}) from None
        except EngineClosed:
            raise shutting_down() from None
        try:
            async with watch_disconnect(request, job) as gone:
                first = await first_item(job, gone)
        except BaseException:
            self.engine.withdraw(job)  # left, refused or cancelled: free its place in line
            raise
        return Generation(self.engine, request, job, first, stops, splitter, endpoint)


def guarded(endpoint: str) -> Callable:
    """A route's unexpected failure as a bare 500 (logged here), counted like any error."""

    def wrap(route: Callable) -> Callable:
        @functools.wraps(route)
        async def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return await route(*args, **kwargs)
            except ApiError:
                raise
            except Exception:
                log.exception("%s request failed", endpoint)
                raise ApiError(500, "internal error", "server_error") from None

        return run

    return wrap
