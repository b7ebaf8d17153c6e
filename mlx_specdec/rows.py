"""One target forward for many sequences, each row computed exactly as it is alone.

A batched verify runs B sequences of T tokens through the target at once, but each sequence has
its own context length and verifies its own number of tokens (`lengths`). What is shared is what
is row-wise: projections, norms, RoPE, MLP and head over the [B, T] tokens. Attention is not
shared: each row's queries (its first `lengths[b]` only) attend over its own KV cache, one call
per row with exactly the shapes and mask the same sequence's forward has when it runs alone.
So on a backend whose matmuls are row-invariant (MLX's CPU backend: a row's result does not
depend on how many rows the call has), every row's logits and taps are bitwise its solo ones.
On GPUs the matmul kernel changes with the row count; there it is measured, not promised.

How: each target layer gets a `RowCaches`, which holds one mlx-lm `KVCache` per row (so each
row rolls back, joins and leaves on its own). Its `update_and_fetch` writes each row into its own
cache and hands back the new keys as a token; the target's attention classes (swapped once,
`prepare`) look the token up when they call mlx-lm's `scaled_dot_product_attention` and run it
per row. Outside a batched forward the swapped classes do exactly what they did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .errors import SpecDecError
from .exact import SDPA, _calls_sdpa
from .recurrent import RecurrentCache, _rebound
from .target import Target

# keys array id -> (per-row (keys, values) views, per-row masks, per-row lengths, row caches)
_ROWS: dict[int, tuple[list[tuple[mx.array, mx.array]], list[Any], list[int], list[Any]]] = {}


class RowMasks(list):
    """Per-row attention masks, each as the row's own cache makes it (None, "causal" or an
    array). Passed through the model as its `mask`; only the per-row attention reads it."""


class RowCaches:
    """One layer's cache for a batched forward: a `KVCache` per row; row b takes `lengths[b]`
    of the forward's T tokens (its other positions are written, then rolled back)."""

    def __init__(self, rows: Sequence[KVCache], lengths: Sequence[int]) -> None:
        self.rows, self.lengths = list(rows), list(lengths)

    @property
    def offset(self) -> mx.array:
        """Each row's position (RoPE reads it per row of the batch)."""
        return mx.array([c.offset for c in self.rows], dtype=mx.int32)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> Any:
        return RowMasks(
            c.make_mask(n, return_array=return_array, window_size=window_size)
            for c, n in zip(self.rows, self.lengths)
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        views = [
            c.update_and_fetch(keys[b : b + 1], values[b : b + 1]) for b, c in enumerate(self.rows)
        ]
        _ROWS[id(keys)] = (views, [], self.lengths, self.rows)
        return keys, values


def _per_row(scope: dict[str, Any]) -> Callable[..., mx.array]:
    """mlx-lm's attention function as `scope` names it, one call per row when its keys came from
    `RowCaches`; unchanged otherwise."""
    import inspect

    signature = inspect.signature(scope[SDPA])

    def call(*args: Any, **kwargs: Any) -> mx.array:
        sdpa = scope[SDPA]
        given = signature.bind(*args, **kwargs).arguments
        found = _ROWS.get(id(given["keys"]))
        if found is None:
            return sdpa(*args, **kwargs)
        views, _, lengths, caches = found
        masks = given.get("mask")
        queries = given["queries"]
        out = []
        for b, ((k, v), n, c) in enumerate(zip(views, lengths, caches)):
            # The row's own query count and keys: the shapes of its solo forward.
            keys = c.offset - queries.shape[2] + n
            one = given | {
                "queries": queries[b : b + 1, :, :n],
                "keys": k[..., :keys, :],
                "values": v[..., :keys, :],
                "cache": c,
                "mask": masks[b] if isinstance(masks, RowMasks) else masks,
            }
            o = sdpa(**one)
            if n < queries.shape[2]:  # positions past the row's length: never read
                pad = mx.zeros((*o.shape[:2], queries.shape[2] - n, o.shape[3]), o.dtype)
                o = mx.concatenate([o, pad], axis=2)
            out.append(o)
        return mx.concatenate(out, axis=0)

    return call


_CLASSES: dict[type, type] = {}


def _row_attention(base: type) -> type:
    if base not in _CLASSES:
        method = base.__call__
        wrapped = _rebound(method, SDPA, _per_row(method.__globals__))
        _CLASSES[base] = type(f"PerRow{base.__name__}", (base,), {"__call__": wrapped})
    return _CLASSES[base]


def refusal(target: Target) -> str | None:
    """Why `target` cannot run batched rounds (None: it can)."""
    if target.recurrent_layers:
        return "batching needs a dense target: this one has recurrent layers; use --max-batch 1"
    if target.exact is not None:
        return "batching does not run with --exact; use --max-batch 1"
    if hasattr(target, "group"):  # distributed.ShardedTarget
        return "batching does not run on a split (distributed) target; use --max-batch 1"
    return None


def prepare(target: Target) -> None:
    """Swap the target's attention classes (its own weight-sharing copy) for per-row ones once;
    refuse what batching does not cover, in one line."""
    why = refusal(target)
    if why:
        raise SpecDecError(why)
    if getattr(target, "_rows_ready", False):
        return
    hooked = 0
    for _, module in target.inner.named_modules():
        cls = type(module)
        if cls in _CLASSES.values():
            hooked += 1
        elif _calls_sdpa(cls):
            module.__class__ = _row_attention(cls)
            hooked += 1
    if not hooked:
        raise SpecDecError(
            f"{target.name}: no attention layer calls mlx-lm's attention function, so rows "
            "cannot attend apart; use --max-batch 1"
        )
    target._rows_ready = True


def make_row_cache(target: Target) -> list[KVCache]:
    """One sequence's target cache: a plain `KVCache` per layer (what the solo loop keeps on the
    CPU), which a batched forward writes through `RowCaches`."""
    cache = target.make_cache(padded=False)
    if any(type(c) is not KVCache for c in cache) or any(
        isinstance(c, RecurrentCache) for c in cache
    ):
        raise SpecDecError(
            f"{target.name}: batching needs plain KV caches on every layer; use --max-batch 1"
        )
    return cache


def forward_rows(
    target: Target, ids: mx.array, caches: Sequence[list[KVCache]], lengths: Sequence[int]
) -> tuple[mx.array, mx.array | None]:
    """ids [B, T] on top of each row's cache -> (logits [B, T, V], taps [B, T, m*H]); row b
    counts its first `lengths[b]` tokens (the rest is padding to roll back)."""
    layers = [RowCaches([c[i] for c in caches], lengths) for i in range(len(caches[0]))]
    try:
        h, taps = target._forward(ids, layers)
        return target.head(h), taps
    finally:
        _ROWS.clear()


class RowRNG:
    """A sequence's own random stream, so its draws do not depend on which rows share a round:
    each call that draws (`with rng:`) runs on MLX's generator seeded from (seed, call count).
    A sequence makes the same calls, with the same shapes, alone or in a batch."""

    MASK = (1 << 63) - 1

    def __init__(self, seed: int) -> None:
        self.seed, self.calls = seed & self.MASK, 0

    def __enter__(self) -> RowRNG:
        # splitmix64 of (seed, call): well-spread seeds for neighbouring calls and sequences.
        z = (self.seed + (self.calls + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
        mx.random.seed((z ^ (z >> 31)) & self.MASK)
        self.calls += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
