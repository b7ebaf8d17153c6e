"""What every route family shares once its prompt is on the engine: the request's output as
`Delta`s then a `GenerationResult`, a client that leaves cancelling its job, and the one SSE tail
that streams any family's event format.

A route family renders its request to token ids, starts a `Generation` (`Server.generate`), then
either `collect`s the whole answer or hands the generation and its `EventFormat` to
`stream_response`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import SpecDecError
from ..generate import GenerationChunk, GenerationResult
from .engine import Engine, Job
from .errors import ApiError
from .output import Delta, OutputSplitter, StopFilter


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


async def first_item(job: Job) -> GenerationChunk | GenerationResult:
    """Wait (in the queue, then through prefill) for the job's first item, so that errors surface
    before any header is sent."""
    item = await job.out.get()
    if isinstance(item, SpecDecError):
        raise ApiError(400, str(item))
    if isinstance(item, Exception):
        raise ApiError(500, f"generation failed: {item}", "server_error")
    return item


class Generation:
    """One request's job on the engine, read as output `Delta`s; `result` is set once they end.

    Stop sequences are cut by `stops`; `splitter` (None: all text is content) separates reasoning
    and tool calls. Leaving early (client gone) or hitting a stop sequence cancels the job: the
    engine stops at its next round.
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
        self.result: GenerationResult | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop sequence ended the output."""
        return self.stops.hit

    def _split(self, text: str) -> Delta:
        return self.splitter.feed(text) if self.splitter else Delta(content=text)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Non-empty deltas as the engine commits tokens; then `result` is set."""
        item: Any = self.first
        try:
            while True:
                if isinstance(item, Exception):
                    raise ApiError(500, f"generation failed: {item}", "server_error")
                if isinstance(item, GenerationResult):
                    delta = self._split(self.stops.flush())
                    if self.splitter:
                        delta.merge(self.splitter.flush())
                    if delta:
                        yield delta
                    self.result = item
                    return
                text = self.stops.feed(item.text)
                if self.stops.hit:
                    self.job.cancel.set()
                delta = self._split(text)
                if delta:
                    yield delta
                item = await self.job.out.get()
        finally:
            self.job.cancel.set()

    async def collect(self) -> Delta:
        """The whole output, for a non-streamed answer; a client that leaves meanwhile cancels
        the job."""
        out = Delta()
        async with watch_disconnect(self.request, self.job) as gone:
            async for delta in self.deltas():
                out.merge(delta)
        self.finish("disconnected" if gone.is_set() else "ok")
        return out

    def finish(self, outcome: str) -> None:
        """Count the request ("ok" or "disconnected") and make sure its job ends."""
        self.job.cancel.set()
        self.engine.metrics.requests.labels(self.endpoint, outcome).inc()

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


def stream_response(gen: Generation, fmt: EventFormat) -> StreamingResponse:
    """The generation as server-sent events. A client that leaves cancels the job and is counted
    as "disconnected"."""

    async def events() -> AsyncIterator[str]:
        outcome = "disconnected"
        try:
            for event in fmt.opening():
                yield event
            async for delta in gen.deltas():
                for event in fmt.piece(delta):
                    yield event
            outcome = "ok"
        finally:
            gen.finish(outcome)
        for event in fmt.closing(gen):
            yield event

    return StreamingResponse(events(), media_type="text/event-stream")
