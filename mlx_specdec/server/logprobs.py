"""Log-probabilities as the OpenAI APIs write them. The engine reports, per generated token, the
target's log-probability (and the most likely tokens there) as plain decoding does; these are
the token entries of chat completions' `logprobs.content` and of the Responses API's
`output_text` parts, `{"token", "logprob", "bytes", "top_logprobs"}`, and the legacy lists of
text completions."""

from __future__ import annotations

import functools
from typing import Any

from ..generate import GenerationChunk

Entry = dict[str, Any]


@functools.lru_cache(maxsize=65536)
def token_text(tokenizer: Any, token: int) -> str:
    """A token's text (a token that ends inside a character decodes to U+FFFD, as in the
    OpenAI API's `token`; `bytes` then holds those bytes)."""
    return tokenizer.decode([token])


def _described(tokenizer: Any, token: int, logprob: float) -> Entry:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def entries(tokenizer: Any, chunk: GenerationChunk) -> list[Entry]:
    """The chunk's tokens as OpenAI token entries (empty when no logprobs were asked for)."""
    if chunk.logprobs is None:
        return []
    tops = chunk.top_logprobs or [[] for _ in chunk.tokens]
    return [
        {
            **_described(tokenizer, token, logprob),
            "top_logprobs": [_described(tokenizer, t, lp) for t, lp in top],
        }
        for token, logprob, top in zip(chunk.tokens, chunk.logprobs, tops, strict=True)
    ]


def legacy(items: list[Entry], top: int, offset: int = 0) -> dict[str, Any]:
    """Token entries as text completions' `logprobs` object; `offset`: where in the text the
    first token starts."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item["token"])
    return {
        "tokens": [item["token"] for item in items],
        "token_logprobs": [item["logprob"] for item in items],
        "top_logprobs": (
            [{t["token"]: t["logprob"] for t in item["top_logprobs"]} for item in items]
            if top
            else None
        ),
        "text_offset": offsets,
    }
