"""What every route family shares once its prompt is on the engine: the request's output as
`Delta`s then a `GenerationResult`, a client that leaves cancelling its job, and the one SSE tail
that streams any family's event format.

A route family renders its request to token ids, starts a `Generation` (`Server.generate`), then
either `collect`s the whole answer or hands the generation and its `EventFormat` to
`stream_response`. Every request is counted once in the metrics: a `Generation` counts itself
when it ends; errors before one exists are counted by the error handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import SpecDecError
from ..generate import GenerationChunk, GenerationResult
from .engine import Engine, EngineClosed, Job, JobCancelled
from .errors import GONE, ApiError, shutting_down
from .logprobs import entries
from .output import Delta, OutputSplitter, StopFilter

DONE = "data: [DONE]\n\n"


def sse(body: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event; `event` names it (Anthropic's and the Responses API's streams name
    every event, OpenAI's chunk streams none)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(body)}\n\n"


def client_gone() -> ApiError:
    """Raised when the client left before its answer began; nobody reads the answer."""
    return ApiError(499, "the client closed the connection", GONE)


@contextlib.asynccontextmanager
async def watch_disconnect(request: Request, job: Job) -> AsyncIterator[asyncio.Event]:
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


def _as_error(item: Exception, cut: bool = False) -> ApiError:
    """An engine's exception as the answer the client gets (never the exception's own text,
    unless it is one of our explained errors)."""
    if isinstance(item, EngineClosed):
        return shutting_down(cut)
    if isinstance(item, JobCancelled):
        return client_gone()
    if isinstance(item, SpecDecError):
        return ApiError(400, str(item))
    return ApiError(500, "generation failed", "server_error")


async def first_item(job: Job, gone: asyncio.Event) -> GenerationChunk | GenerationResult:
    """Wait (in the queue, then through prefill) for the job's first item, so that errors surface
    before any header is sent. A client that leaves meanwhile ends the wait at once."""
    getter = asyncio.ensure_future(job.out.get())
    leaving = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({getter, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        got = getter.done()
        if not got:
            getter.cancel()  # safe: an asyncio.Queue loses no item to a cancelled get
    if not got:
        raise client_gone()
    item = getter.result()
    if isinstance(item, Exception):
        raise _as_error(item)
    return item


class Generation:
    """One request's job on the engine, read as output `Delta`s; `result` is set once they end.

    Stop sequences are cut by `stops`; `splitter` (None: all text is content) separates reasoning
    and tool calls. Leaving early (client gone), hitting a stop sequence or making the last tool
    call allowed cancels the job: the engine stops at its next round. A job a shutdown cut short
    ends in an error. `prompt_tokens` is the prompt's length.
    """

    def __init__(
        self,
        engine: Engine,
        request: Request,
        job: Job,
        first: GenerationChunk | GenerationResult,
        stops: StopFilter,
        splitter: OutputSplitter | None,
        endpoint: str,
    ) -> None:
        self.engine, self.request, self.job, self.first = engine, request, job, first
        self.stops, self.splitter, self.endpoint = stops, splitter, endpoint
        self.prompt_tokens = len(job.ids)
        self.result: GenerationResult | None = None
        self.outcome: str | None = None
        self._answer_tokens = 0  # tokens of the rounds up to the one that ended the answer

    @property
    def stopped(self) -> bool:
        """Whether a stop sequence ended the output."""
        return self.stops.hit

    @property
    def output_tokens(self) -> int:
        """The answer's tokens, for usage. A stop sequence (or the last tool call allowed) ends
        it within a round; the engine may commit another round before it sees the cancel, and
        those tokens are not counted, so the count does not depend on that race."""
        assert self.result is not None
        return self._answer_tokens if self.ended else len(self.result.tokens)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (known from the first output on)."""
        if isinstance(self.first, GenerationResult):
            return self.first.cached_tokens
        return self.first.cache_info.get("cached_tokens", 0)

    def finish_reason(self, tool_calls: int = 0) -> str:
        """OpenAI's finish reason once the output ended: `stop` (an end token or a stop
        sequence), `length`, or `tool_calls` when the answer made calls and ended on its own."""
        if self.stopped:
            return "stop"
        if tool_calls and self.result.finish_reason == "stop":
            return "tool_calls"
        return self.result.finish_reason

    def _split(self, text: str) -> Delta:
        return self.splitter.feed(text) if self.splitter else Delta(content=text)

    @property
    def ended(self) -> bool:
        """Whether the answer is over (a stop sequence met, the last allowed call made), though
        the engine may still commit a round."""
        return self.stops.hit or bool(self.splitter and self.splitter.done)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Non-empty deltas as the engine commits tokens; then `result` is set."""
        item: Any = self.first
        scores = _Scores(self.engine.tokenizer)
        try:
            while True:
                if isinstance(item, Exception):
                    raise _as_error(item, cut=True)
                if isinstance(item, GenerationResult):
                    if self.job.shutdown:
                        raise shutting_down(cut=True)
                    delta = self._split(self.stops.flush())
                    if self.splitter:
                        delta.merge(self.splitter.flush())
                    if delta := scores.attach(delta):
                        yield delta
                    self.result = item
                    return
                if not self.ended:  # (rounds after the end are not part of the answer)
                    scores.add(item)
                    self._answer_tokens += len(item.tokens)
                delta = self._split(self.stops.feed(item.text))
                if self.ended:
                    self.job.cancel.set()
                if delta := scores.attach(delta):
                    yield delta
                item = await self.job.out.get()
        finally:
            self.job.cancel.set()

    async def collect(self, sink: Callable[[Delta], Any] | None = None) -> Delta:
        """The whole output, for a non-streamed answer (each delta also goes to `sink`, if
        given); a client that leaves meanwhile cancels the job. An error is left for the error
        handlers to count."""
        out = Delta()
        async with watch_disconnect(self.request, self.job) as gone:
            async for delta in self.deltas():
                out.merge(delta)
                if sink is not None:
                    sink(delta)
        self.finish("disconnected" if gone.is_set() else "ok")
        return out

    def finish(self, outcome: str) -> None:
        """Count the request (once) and make sure its job ends."""
        self.job.cancel.set()
        if self.outcome is None:
            self.outcome = outcome
            self.engine.metrics.count(self.endpoint, outcome)

    def x_specdec(self) -> dict[str, Any]:
        """How speculative decoding went, the block every answer carries."""
        r = self.result
        return {
            "mode": r.mode,
            "drafter": self.engine.config.drafter,
            "mean_accept_len": round(r.mean_accept_len, 3),
            "decode_tokens_per_sec": round(r.tokens_per_sec, 2),
            "prefill_ms": round(r.prefill_seconds * 1000, 2),
            "cached_prompt_tokens": r.cached_tokens,
            "prefix_cache": r.prefix_cache,
            "rounds": len(r.rounds),
        }


class _Scores:
    """Token log-probabilities waiting for the text they made: given to the next delta with
    answer text, dropped when that text was reasoning or a tool call (the APIs report the
    answer's tokens). They go by round, so a round that ends the reasoning and starts the answer
    counts as answer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.pending = tokenizer, []

    def add(self, chunk: GenerationChunk) -> None:
        self.pending += entries(self.tokenizer, chunk)

    def attach(self, delta: Delta) -> Delta:
        if delta.content:
            delta.logprobs, self.pending = self.pending, []
        elif delta:
            self.pending = []
        return delta


class EventFormat(Protocol):
    """How a route family writes a streamed answer: each method gives finished SSE events."""

    def opening(self) -> Iterable[str]:
        """Events before any output."""
        ...

    def piece(self, delta: Delta) -> Iterable[str]:
        """Events for one piece of output."""
        ...

    def closing(self, gen: Generation) -> Iterable[str]:
        """Events after the output; `gen.result` is set."""
        ...

    def error(self, e: ApiError) -> Iterable[str]:
        """The last events of a stream an error ended (a shutdown)."""
        ...


class _EventStream(StreamingResponse):
    """A streamed answer that counts its request even when it never started to send (the
    client left first)."""

    def __init__(self, gen: Generation, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.finish("disconnected")  # a no-op once counted


def stream_response(gen: Generation, fmt: EventFormat) -> StreamingResponse:
    """The generation as server-sent events. A client that leaves cancels the job and is counted
    as "disconnected"; an error after the first event (a shutdown) ends the stream with the
    format's error events."""

    async def events() -> AsyncIterator[str]:
        outcome = "disconnected"
        try:
            for event in fmt.opening():
                yield event
            async for delta in gen.deltas():
                for event in fmt.piece(delta):
                    yield event
            outcome = "ok"
        except ApiError as e:
            outcome = e.outcome
            for event in fmt.error(e):
                yield event
        finally:
            gen.finish(outcome)
        if outcome == "ok":
            for event in fmt.closing(gen):
                yield event

    return _EventStream(gen, events())
