"""One target forward for many sequences, each row computed exactly as it is alone.

A batched verify runs B sequences of T tokens through the target at once; each sequence has its
own context length, and verifies its own number of tokens (the rest of its T positions are
rolled back). Every target layer gets a `BatchKV`: one key/value buffer for all rows, row b's
positions at 0..offsets[b]-1 (right padding after them), written at each row's own offset, and
an attention mask that shows each query its own row's causal prefix only.

Why the rows are exact: on MLX's CPU backend matmuls are row-invariant (a row's result does not
depend on how many rows the call has), and attention of a query over a padded, masked key
buffer is bitwise attention over its own keys alone (tests/test_batch.py checks it for ragged
lengths). So every row's logits and taps are its solo forward's, and a row's draws are its own
(`RowRNG`). On GPUs the kernels change with the row count; there it is measured, not promised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .errors import SpecDecError
from .recurrent import RecurrentCache
from .target import Target


class BatchKV:
    """One layer's keys and values for B rows: [B, heads, capacity, dim], row b's first
    `offsets[b]` positions valid. Rows roll back on their own (`trim`), join (`append`, a row
    prefilled alone) and leave (`keep`)."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offsets: list[int] = []

    @property
    def offset(self) -> mx.array:
        """Each row's position (RoPE reads it per row)."""
        return mx.array(self.offsets, dtype=mx.int32)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _room(self, n: int) -> int:
        need = -(-(max(self.offsets) + n) // self.step) * self.step
        return max(self.capacity, need)

    def _grow(self, capacity: int) -> None:
        if self.keys is None or capacity <= self.capacity:
            return
        b, h, _, d = self.keys.shape
        pad = (b, h, capacity - self.capacity)
        self.keys = mx.concatenate([self.keys, mx.zeros((*pad, d), self.keys.dtype)], axis=2)
        dv = self.values.shape[3]
        self.values = mx.concatenate([self.values, mx.zeros((*pad, dv), self.values.dtype)], 2)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> Any:
        """[B, 1, N, max offset + N]: query i of row b sees that row's keys up to its own
        position."""
        query = self.offset[:, None, None, None] + mx.arange(N)[:, None]
        key = mx.arange(max(self.offsets) + N)  # the keys update_and_fetch will return
        visible = key <= query
        if window_size is not None:
            visible = visible & (key > query - window_size)
        return visible

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        self._grow(self._room(n))
        at = (self.offset[:, None] + mx.arange(n))[:, None, :, None]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(at, keys.shape), keys, axis=2)
        at = mx.broadcast_to(at, values.shape)
        self.values = mx.put_along_axis(self.values, at, values, axis=2)
        self.offsets = [o + n for o in self.offsets]
        end = max(self.offsets)  # no row reads past it: attention skips the buffer's tail
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def trim(self, row: int, n: int) -> None:
        self.offsets[row] -= n

    def append(self, cache: KVCache) -> None:
        """Add a row: the first `cache.offset` positions of a cache filled alone."""
        n = cache.offset
        k, v = cache.keys[..., :n, :], cache.values[..., :n, :]
        if self.keys is None:
            self.keys, self.values, self.offsets = k, v, [n]
            self._grow(-(-n // self.step) * self.step)
            return
        self._grow(-(-n // self.step) * self.step)
        pad = self.capacity - n
        if pad:
            k = mx.concatenate([k, mx.zeros((*k.shape[:2], pad, k.shape[3]), k.dtype)], axis=2)
            v = mx.concatenate([v, mx.zeros((*v.shape[:2], pad, v.shape[3]), v.dtype)], axis=2)
        self.keys = mx.concatenate([self.keys, k])
        self.values = mx.concatenate([self.values, v])
        self.offsets.append(n)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep these rows, in this order (the others leave)."""
        if not rows:
            self.keys = self.values = None
            self.offsets = []
            return
        index = mx.array(list(rows), dtype=mx.int32)
        self.keys, self.values = self.keys[index], self.values[index]
        self.offsets = [self.offsets[i] for i in rows]


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
    """Refuse, in one line, a target batching does not cover."""
    why = refusal(target)
    if why:
        raise SpecDecError(why)


def make_row_cache(target: Target) -> list[KVCache]:
    """One sequence's cache for its prefill alone: a plain `KVCache` per layer (what the solo
    loop keeps on the CPU), moved into the batch's `BatchKV`s once it is filled."""
    cache = target.make_cache(padded=False)
    if any(type(c) is not KVCache or isinstance(c, RecurrentCache) for c in cache):
        raise SpecDecError(
            f"{target.name}: batching needs plain KV caches on every layer; use --max-batch 1"
        )
    return cache


def batch_kv(rows: Sequence[list[KVCache]], layers: int) -> list[BatchKV]:
    """The batch's caches holding these rows (each a cache list filled alone)."""
    out = [BatchKV() for _ in range(layers)]
    for cache in rows:
        for kv, c in zip(out, cache):
            kv.append(c)
    return out


def forward_rows(
    target: Target, ids: mx.array, kv: list[BatchKV]
) -> tuple[mx.array, mx.array | None]:
    """ids [B, T] on top of the batch's caches -> (logits [B, T, V], taps [B, T, m*H])."""
    h, taps = target._forward(ids, kv)
    return target.head(h), taps


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
