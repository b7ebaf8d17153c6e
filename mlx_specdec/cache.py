"""Caches the loop can roll back exactly, and prefix snapshots of them.

Most caches the loop keeps (the target's attention layers, the drafter's context layers) are KV
caches whose rows are token positions: rolling back is moving the offset, and a prefix of a run
is the first n rows of every layer. `PaddedKVCache` is the same cache with shapes that repeat,
for backends that compile one attention graph per key length. A hybrid target's recurrent
layers (`recurrent.RecurrentCache`) hold a state valid at one position only, so a snapshot of
them is taken, and restored, at exactly its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from .errors import SpecDecError
from .recurrent import RecurrentCache


def padded_by_default() -> bool:
    """Padded attention where it pays: MLX's CUDA backend (see `PaddedKVCache`)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def kv_cache(padded: bool) -> KVCache:
    """A fresh KV cache: a `PaddedKVCache` if `padded`, else mlx-lm's `KVCache`."""
    return PaddedKVCache() if padded else KVCache()


class PaddedKVCache(KVCache):
    """A KV cache whose attention sees the whole allocated buffer (a multiple of `step` rows),
    with an explicit mask hiding the rows past the offset.

    Why: MLX's CUDA backend runs multi-token attention through cuDNN and builds (slowly) one
    cuDNN graph per distinct key length. Verify rounds advance the context by a different
    amount each round, so with exact-length keys nearly every round pays a graph build; with
    the padded buffer the shapes repeat until the buffer grows. The masked rows add exact zeros.
    """

    def _capacity(self, n: int) -> int:
        have = 0 if self.keys is None else self.keys.shape[2]
        need = -(-(self.offset + n) // self.step) * self.step
        return max(have, need)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        cap = self._capacity(n)
        if self.keys is None or cap > self.keys.shape[2]:
            grow = cap - (0 if self.keys is None else self.keys.shape[2])
            b, h, _, dk = keys.shape
            new_k = mx.zeros((b, h, grow, dk), keys.dtype)
            new_v = mx.zeros((b, h, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
        self.keys[..., self.offset : self.offset + n, :] = keys
        self.values[..., self.offset : self.offset + n, :] = values
        self.offset += n
        return self.keys, self.values

    def make_mask(
        self, N: int, return_array: bool = False, window_size: int | None = None
    ) -> mx.array:
        query = self.offset + mx.arange(N)[:, None]
        key = mx.arange(self._capacity(N))[None]
        visible = key <= query
        if window_size is not None:
            visible = visible & (key > query - window_size)
        return visible


# ------------------------------------------------------------------------------ prefix snapshots
@dataclass(frozen=True, eq=False)
class Snapshot:
    """The first `len(tokens)` positions of a run's caches: target layers, then drafter layers.
    Immutable: a request fills its own fresh caches with slices of it. With `recurrent` layers
    it is not `cuttable`: it serves its whole length only."""

    owner: str  # fingerprint of the target/drafter pair these caches belong to
    tokens: np.ndarray  # int64 [n]
    # Per cache: keys, values [B, heads, n, dim]; a recurrent layer: its conv window (and state).
    layers: tuple[tuple[mx.array, ...], ...]
    n_target: int  # how many of `layers` are the target's
    recurrent: frozenset[int] = frozenset()  # which of `layers` are recurrent states

    @property
    def key(self) -> tuple[str, bytes]:
        return self.owner, self.tokens.tobytes()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer)

    @property
    def cuttable(self) -> bool:
        """Can it serve a shorter prefix than its own (no recurrent layers)?"""
        return not self.recurrent


def cacheable(caches: Sequence[Any]) -> bool:
    """Can these caches be snapshotted: plain KV caches (not quantized or rotating ones), and
    recurrent layers (at exact positions only)."""
    return all(type(c) in (KVCache, PaddedKVCache, RecurrentCache) for c in caches)


def snapshot_lengths(tokens: Sequence[int], caches: Sequence[Any]) -> list[int]:
    """The prefixes of `tokens` every cache can give a snapshot of, ascending (KV caches only:
    the longest, a KV cache cuts anywhere up to its offset; a recurrent layer only where it
    holds or keeps a state)."""
    held = min([len(tokens)] + [c.offset for c in caches if not isinstance(c, RecurrentCache)])
    exact = [c.positions() for c in caches if isinstance(c, RecurrentCache)]
    if not exact:
        return [held] if held > 0 else []
    return sorted(n for n in set.intersection(*exact) if 0 < n <= held)


def take_snapshot(
    owner: str, tokens: Sequence[int], target_cache: Sequence[Any], drafter_state: Sequence[Any]
) -> Snapshot:
    """Copy the first `len(tokens)` positions of every cache (every one must hold that many; a
    recurrent layer must hold its state at exactly that position, `RecurrentCache.state_at`)."""
    n = len(tokens)
    layers: list[tuple[mx.array, ...]] = []
    recurrent = []
    for i, c in enumerate((*target_cache, *drafter_state)):
        if isinstance(c, RecurrentCache):
            layers.append(tuple(c.state_at(n)))  # immutable arrays: the cache only replaces them
            recurrent.append(i)
            continue
        if c.offset < n:
            raise SpecDecError(f"a cache holds {c.offset} positions, fewer than the {n} tokens")
        layers.append((mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :])))
    mx.eval(layers)
    tokens = np.asarray(tokens, dtype=np.int64)
    return Snapshot(owner, tokens, tuple(layers), len(target_cache), frozenset(recurrent))


def restore(snapshot: Snapshot, length: int, caches: Sequence[Any]) -> None:
    """Fill empty caches (target layers then drafter layers) with the snapshot's first `length`
    positions (all of them if it has recurrent layers)."""
    if len(caches) != len(snapshot.layers):
        raise SpecDecError(f"the snapshot has {len(snapshot.layers)} layers, not {len(caches)}")
    if not snapshot.cuttable and length != len(snapshot.tokens):
        raise SpecDecError(
            f"a snapshot of recurrent layers serves its {len(snapshot.tokens)} positions only, "
            f"not {length}"
        )
    for i, (c, arrays) in enumerate(zip(caches, snapshot.layers)):
        if (i in snapshot.recurrent) != isinstance(c, RecurrentCache):
            raise SpecDecError("the snapshot's layer types do not match the caches")
        if isinstance(c, RecurrentCache):
            c.fill(arrays, length)
            continue
        k, v = arrays
        # Slices are new array objects: the cache's in-place writes never reach the snapshot.
        c.keys, c.values, c.offset = k[..., :length, :], v[..., :length, :], length
