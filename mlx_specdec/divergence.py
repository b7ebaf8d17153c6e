"""Where two greedy outputs part, and why: a near-tie or a real mismatch.

When a speculative output differs from plain decoding's, the question is whether the target
itself was nearly undecided there. At the first differing token, the logits plain decoding
computed (replayed step by step, as mlx-lm's `generate_step` runs them) give the margin between
the two tokens the runs picked, counted in ulps of the target's dtype: the number of values that
dtype can represent between them. Kernels that reduce in another order move logits by a few
ulps, so a pick within `NEAR_TIE_ULPS` can flip that way; a larger margin cannot, and means a
bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .exact import ExactVerify

# The largest margin, in ulps of the logits' dtype, that rounding in another reduction order
# can bridge. Measured on an H200 (issue 18): every GPU divergence was within 3 bf16 ulps. A
# float32 ulp is 2^16 times finer while the kernels' rounding is not 2^16 times smaller, so its
# band is wider in ulps (4096 float32 ulps = 1/16 of a bfloat16 ulp).
NEAR_TIE_ULPS = {"bfloat16": 8, "float16": 8, "float32": 4096}


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _ordered(values: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """The values' bit patterns in `dtype` as integers that order like the values (so the
    difference of two counts the representable values between them)."""
    x = np.asarray(values, dtype=np.float32)
    if dtype == mx.bfloat16:
        bits, sign = (x.view(np.int32) >> 16).astype(np.int64), 1 << 15
    elif dtype == mx.float16:
        bits, sign = x.astype(np.float16).view(np.int16).astype(np.int64), 1 << 15
    else:
        bits, sign = x.view(np.int32).astype(np.int64), 1 << 31
    return np.where(bits < 0, -(bits & (sign - 1)), bits)


def ulp_distance(a: Any, b: Any, dtype: mx.Dtype) -> np.ndarray:
    """|a - b| in ulps of `dtype`, elementwise (arrays of equal shape, or floats)."""
    a = np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float32)
    b = np.asarray(b.astype(mx.float32) if isinstance(b, mx.array) else b, dtype=np.float32)
    return np.abs(_ordered(a, dtype) - _ordered(b, dtype))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (one ending early counts), or None."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_logits(model: Any, ids: Sequence[int]) -> mx.array:
    """The logits [V] plain decoding computes after `ids`: mlx-lm's prefill chunks of all but
    the last prompt token, then one-token steps, on mlx-lm's own cache."""
    cache = make_prompt_cache(model)
    x = mx.array(list(ids), dtype=mx.int32)
    start, logits = 0, None
    for end in ExactVerify.prefill_ends(len(ids)):
        logits = model(x[None, start:end], cache=cache)
        mx.eval(logits, [c.state for c in cache])
        start = end
    assert logits is not None
    return logits[0, -1]


@dataclass(frozen=True)
class Divergence:
    """The first token where an output leaves the reference (plain decoding)."""

    position: int  # index among the generated tokens
    expected: int | None  # the reference's token there (None: the reference ended)
    got: int | None  # the other output's token there (None: it ended)
    compared: tuple[int, int]  # the two tokens whose logits give the margin
    margin_ulps: int  # |logit difference| of `compared`, in ulps of `dtype`
    dtype: str

    @property
    def near_tie(self) -> bool:
        return self.margin_ulps <= NEAR_TIE_ULPS.get(self.dtype, NEAR_TIE_ULPS["float32"])

    def describe(self) -> str:
        what = f"{self.margin_ulps} {self.dtype} ulp{'s' if self.margin_ulps != 1 else ''}"
        a, b = self.compared
        ended = "" if None not in (self.expected, self.got) else "one output ended there; "
        if self.near_tie:
            return (
                f"a near-tie: {ended}the target's logits for tokens {a} and {b} are {what} "
                "apart, within the rounding of another kernel order"
            )
        return (
            f"a real mismatch: {ended}the target prefers token {a} over {b} by {what}, far "
            "beyond kernel rounding: a bug"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "near_tie": self.near_tie}


def find_divergence(
    model: Any,
    prompt: Sequence[int],
    reference: Sequence[int],
    other: Sequence[int],
    *,
    memo: dict[Any, mx.array] | None = None,
) -> Divergence | None:
    """Where `other` leaves `reference` (both generated after `prompt` by `model`, an mlx-lm
    model), and the target's margin there. When one output ended, the margin is between the
    target's top two logits. `memo` keeps the logits replayed, for several outputs of one
    prompt."""
    where = first_difference(reference, other)
    if where is None:
        return None
    ids = (*prompt, *reference[:where])
    memo = {} if memo is None else memo
    if ids not in memo:
        memo[ids] = decode_logits(model, ids)
    logits = memo[ids]
    expected = reference[where] if where < len(reference) else None
    got = other[where] if where < len(other) else None
    if expected is None or got is None:
        a, b = mx.argsort(-logits.astype(mx.float32))[:2].tolist()
    else:
        a, b = expected, got
    margin = int(ulp_distance(logits[a], logits[b], logits.dtype))
    return Divergence(where, expected, got, (a, b), margin, dtype_name(logits.dtype))


def compare_line(
    model: Any, prompt: Sequence[int], reference: Sequence[int], other: Sequence[int]
) -> str:
    """`generate --compare`'s verdict on `other` against `reference` (plain decoding)."""
    d = find_divergence(model, prompt, reference, other)
    if d is None:
        return "outputs identical"
    return f"outputs DIFFERENT from token {d.position}: {d.describe()}"
