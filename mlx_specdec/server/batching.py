"""What the engine's batched worker keeps per request: the `batch.Request` a job's options make,
and the job's detokenized stream, fed one `batch.Event` at a time through the same
`generate.stream_steps` the one-at-a-time worker streams through."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ..batch import Event, Request
from ..generate import GenerationChunk, GenerationResult, Steps, stream_steps
from ..sampling import SamplingParams

# Job options a batched round honours; a job with any other runs alone (`batchable`).
BATCHED_OPTIONS = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "leading_space",
}


def batchable(options: dict[str, Any]) -> bool:
    return set(options) <= BATCHED_OPTIONS


def make_request(
    ids: list[int], options: dict[str, Any], eos: set[int], max_draft: int | None
) -> Request:
    params = SamplingParams(
        options.get("temperature", 0.0),
        options.get("top_p", 1.0),
        options.get("top_k", 0),
        options.get("min_p", 0.0),
        options.get("seed"),
    )
    return Request(ids, int(options.get("max_new_tokens", 256)), params, eos, max_draft)


class RowStream:
    """One request's chunks: each event's tokens through `stream_steps` (detokenizing, the stop
    token held back), and at the end its `GenerationResult`, timed from when it was admitted."""

    def __init__(
        self, tokenizer: Any, request: Request, mode: str, leading_space: bool = False
    ) -> None:
        self.request = request
        self._feed: deque[tuple[list[int], Any] | None] = deque()
        n, most = len(request.ids), request.max_new_tokens
        self._chunks = stream_steps(
            tokenizer, self._steps(), n, most, mode, {}, leading_space=leading_space
        )
        self.admitted = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0

    def _steps(self) -> Steps:
        while (item := self._feed.popleft()) is not None:
            yield item

    def add(self, event: Event) -> GenerationChunk:
        self.first = self.first or time.perf_counter()
        self.tokens += len(event.tokens)
        self._feed.append((event.tokens, event.round))
        return next(self._chunks)

    def finish(self, cancelled: bool = False) -> tuple[GenerationChunk, GenerationResult]:
        """The last chunk (text the detokenizer held) and the result; a cancelled request ends
        as the one-at-a-time worker ends it ("stop", no text)."""
        end = time.perf_counter()
        self._feed.append(None)
        last = next(self._chunks)
        first = self.first or end
        result = replace(
            last.result, prefill_seconds=first - self.admitted, decode_seconds=end - first
        )
        if cancelled:
            result = replace(result, text="", finish_reason="stop")
        return last, result

    def __iter__(self) -> Iterator[GenerationChunk]:  # pragma: no cover - not iterable
        raise TypeError("feed a RowStream with add()")
