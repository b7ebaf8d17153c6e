"""What OpenAI's chat and text completions share: the one choice, `usage`, `finish_reason`, and
the chunk stream (`data:` events that end with the finish reason, usage and `[DONE]`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from .errors import ApiError
from .output import Delta
from .streaming import DONE, Generation, sse


def choice(key: str, value: Any, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
    """The only choice (n is 1), carrying `value` under `key` (message, delta or text)."""
    return {"index": 0, key: value, "finish_reason": finish, "logprobs": logprobs}


def usage(gen: Generation) -> dict[str, Any]:
    result, n = gen.result, gen.output_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": result.prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def stats(gen: Generation) -> dict[str, Any]:
    """The `usage` and `x_specdec` blocks of an answer's last body."""
    return {"usage": usage(gen), "x_specdec": gen.x_specdec()}


class ChunkStream:
    """An `EventFormat` for OpenAI streams: every chunk is `base` plus the one choice, which
    carries a piece under `key` (and its tokens' `logprobs`, when `top_logprobs` is not None:
    how many top tokens were asked for). The finish reason comes in a chunk with an `empty`
    piece, and usage either in that chunk or, when the client asked for `include_usage`, in a
    chunk of its own with no choices (as OpenAI sends it)."""

    key: ClassVar[str]
    empty: ClassVar[Any]

    def __init__(
        self, base: dict[str, Any], include_usage: bool, top_logprobs: int | None = None
    ) -> None:
        self.base, self.include_usage, self.top_logprobs = base, include_usage, top_logprobs

    def chunk(
        self, value: Any, finish: str | None = None, logprobs: Any = None, **extra: Any
    ) -> str:
        return sse({**self.base, "choices": [choice(self.key, value, finish, logprobs)], **extra})

    def opening(self) -> Iterable[str]:
        return ()

    def piece(self, delta: Delta) -> Iterable[str]:
        raise NotImplementedError

    def finish_reason(self, gen: Generation) -> str:
        return gen.finish_reason()

    def closing(self, gen: Generation) -> Iterator[str]:
        reason, last = self.finish_reason(gen), stats(gen)
        if self.include_usage:
            yield self.chunk(self.empty, reason)
            yield sse({**self.base, "choices": [], **last})
        else:
            yield self.chunk(self.empty, reason, **last)
        yield DONE

    def error(self, e: ApiError) -> Iterator[str]:
        yield sse(e.body())
        yield DONE
