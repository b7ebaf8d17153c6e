"""Exact verify: every row of a K-row verify computed by the kernels plain decoding runs there.

Why: MLX picks a GPU kernel by the number of rows. One token (the decode step) takes the
matrix-vector kernels (GEMV, qmv) and vector attention; K tokens (a verify) take GEMM / qmm and
multi-query attention, which reduce in another order. The rows then differ in the last bits,
and a greedy pick at a near-tie can flip. docs/exactness.md has the dispatch, read from MLX's
sources, per backend.

What changes while a verify forward runs under `rows(plan)` (nothing runs differently outside):

- Matmuls (`nn.Linear`, `nn.QuantizedLinear`, a tied embedding used as the output projection)
  run their rows in chunks of at most `plan.matmul` / `plan.quantized` rows along the token
  axis. A chunk of one row is exactly the decode step's call (M = 1: GEMV / qmv).
- Attention runs one call per row, with that row's query alone over its own causal prefix,
  read from the KV buffer the decode step would have had (`ExactKVCache`; a sliding window's
  ring, `ExactRotatingKVCache`). The call has the decode step's shapes and keys, so MLX
  dispatches it to the decode step's kernel (vector attention; on CUDA past 256 keys, cuDNN's
  decode path, which depends on the buffer's size).
- Norms, RoPE, activations and residual adds run all rows at once: MLX computes them row by
  row with a kernel chosen by the row's length only (`mlx-specdec doctor` checks it).

Around the verify: prefill follows mlx-lm's `generate_step` (chunks of 2048 tokens, then the
last prompt token alone, a decode step), and the greedy pick reads the log-probabilities
mlx-lm's sampler reads (`decode_scores`). On the CPU backend matmuls are row-invariant, so
its plan (`default_plan`) keeps them whole and splits attention only.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .recurrent import _rebound

MLX_LM_PREFILL_STEP = 2048  # mlx-lm generate_step's prefill_step_size default
SDPA = "scaled_dot_product_attention"  # the name mlx-lm's attention layers call (models.base)


@dataclass(frozen=True)
class RowPlan:
    """How many rows one call of each row-variant op may take and stay bit-identical to the
    decode step. 1 is the decode step's own shape, exact by construction on every backend;
    wider chunks are only safe below a kernel switch (docs/exactness.md)."""

    matmul: int | None = 1  # dense matmuls: GEMV only at M = 1 on CUDA and Metal
    quantized: int | None = 1  # quantized matmuls: qmv at M = 1 (wider only below a switch)

    def describe(self) -> str:
        def rows(n: int | None) -> str:
            if n is None:
                return "all rows in one call"
            return "one row per call" if n == 1 else f"up to {n} rows per call"

        return (
            f"matmuls {rows(self.matmul)}, quantized matmuls {rows(self.quantized)}, "
            "attention one row per call over its own prefix"
        )


CPU_PLAN = RowPlan(matmul=None, quantized=None)  # MLX's CPU matmuls are row-invariant
# MLX CUDA runs a quantized matmul of fewer than 8 rows as qmv, one row per thread block, the
# same code for each row (quantized.cpp: `M * B < 8`; not on the sm90 kernel, which needs a
# quantization group as long as a row). Dense matmuls take GEMV at one row only.
CUDA_PLAN = RowPlan(matmul=1, quantized=7)


def default_plan() -> RowPlan:
    """The plan for this backend (docs/exactness.md). CPU: matmuls whole (row-invariant there),
    attention per row (a sliding window's ring reads its keys in another order than a verify's).
    CUDA: quantized matmuls in chunks below the qmv switch, the rest per row. Metal: everything
    per row (its qmv switch depends on the chip; the doctor measures it)."""
    if mx.default_device() == mx.cpu:
        return CPU_PLAN
    return CUDA_PLAN if mx.cuda.is_available() else RowPlan()


# ----------------------------------------------------------------------------- matmuls
def split_rows(call: Callable[[mx.array], mx.array], x: mx.array, width: int | None) -> mx.array:
    """`call(x)` on chunks of at most `width` rows of the token axis (axis 1 of [B, T, ...]);
    None: at once."""
    if width is None or x.ndim < 3 or x.shape[1] <= width:
        return call(x)
    parts = [call(x[:, i : i + width]) for i in range(0, x.shape[1], width)]
    return mx.concatenate(parts, axis=1)


def _width(quantized: bool) -> int | None:
    active = _PLAN.get()
    if active is None:
        return None
    return active[0].quantized if quantized else active[0].matmul


_ROW_CLASSES: dict[type, type] = {}


def _row_linear(base: type) -> type:
    if base not in _ROW_CLASSES:
        quantized = issubclass(base, nn.QuantizedLinear)

        def __call__(self: Any, x: mx.array) -> mx.array:
            width = _width(quantized)
            if width is None:
                return base.__call__(self, x)
            return split_rows(lambda r: base.__call__(self, r), x, width)

        _ROW_CLASSES[base] = type(f"Rows{base.__name__}", (base,), {"__call__": __call__})
    return _ROW_CLASSES[base]


def _row_embedding(base: type) -> type:
    """A tied embedding: lookups unchanged, its use as the output projection split."""
    if base not in _ROW_CLASSES:
        quantized = issubclass(base, nn.QuantizedEmbedding)

        def as_linear(self: Any, x: mx.array) -> mx.array:
            width = _width(quantized)
            if width is None:
                return base.as_linear(self, x)
            return split_rows(lambda r: base.as_linear(self, r), x, width)

        _ROW_CLASSES[base] = type(f"Rows{base.__name__}", (base,), {"as_linear": as_linear})
    return _ROW_CLASSES[base]


# ----------------------------------------------------------------------------- attention
@dataclass
class _Verify:
    """What one verify forward's attention reads: per layer, for the keys array its cache
    returned (by id: Gemma's KV-shared layers pass those same arrays on), each row's keys and
    values as the decode step of that row attends over, and whether that step has no mask."""

    rows: dict[int, tuple[list[tuple[mx.array, mx.array]], bool]] = field(default_factory=dict)


_PLAN: ContextVar[tuple[RowPlan, _Verify] | None] = ContextVar("mlx_specdec_exact", default=None)


@contextlib.contextmanager
def rows(plan: RowPlan | None) -> Iterator[None]:
    """While the block builds a verify forward's graph, the hooked ops follow `plan`."""
    token = _PLAN.set(None if plan is None else (plan, _Verify()))
    try:
        yield
    finally:
        _PLAN.reset(token)


def _publish(keys: mx.array, views: list[tuple[mx.array, mx.array]], unmasked: bool) -> None:
    active = _PLAN.get()
    assert active is not None
    active[1].rows[id(keys)] = (views, unmasked)


def _view(a: mx.array, n: int) -> mx.array:
    """The first n rows, as a new array: a later in-place write to the cache's array (which
    rebinds that Python object) leaves it as it is."""
    return a[..., :n, :]


class ExactKVCache(KVCache):
    """mlx-lm's `KVCache`; in a verify it also gives each new row the keys and values the decode
    step of that row attends over.

    The decode step writes one row at a time into a buffer that grows by `step` (256) rows when
    full: after n rows it holds ceil(n / 256) * 256. MLX's CUDA backend reads that size (cuDNN's
    decode path, from 256 keys on), so each row's view is a slice of the buffer as it was when
    that row was written: rows are written in segments that end where the decode step would
    have grown the buffer, and after a rollback the buffer is cut back to the decode step's
    size. Prefill (no plan active) is mlx-lm's own update.
    """

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _fit(self) -> None:
        """Cut (or pad) the buffer to what the decode step would hold after `offset` rows."""
        want = math.ceil(self.offset / self.step) * self.step
        if self.keys is None or self.capacity == want:
            return
        keep_k, keep_v = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        if pad := want - self.offset:
            b, h, _, dk = keep_k.shape
            keep_k = mx.concatenate([keep_k, mx.zeros((b, h, pad, dk), keep_k.dtype)], axis=2)
            dv = keep_v.shape[3]
            keep_v = mx.concatenate([keep_v, mx.zeros((b, h, pad, dv), keep_v.dtype)], axis=2)
        self.keys, self.values = mx.contiguous(keep_k), mx.contiguous(keep_v)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if _PLAN.get() is None:
            return super().update_and_fetch(keys, values)
        self._fit()
        n, done, views = keys.shape[2], 0, []
        while done < n:
            room = self.capacity - self.offset
            take = min(n - done, room if room > 0 else self.step)
            # A segment never crosses the decode step's growth point: mlx-lm grows the buffer
            # (by one step, from a full buffer) exactly as the decode step does.
            part = slice(done, done + take)
            super().update_and_fetch(keys[:, :, part], values[:, :, part])
            for end in range(self.offset - take + 1, self.offset + 1):
                views.append((_view(self.keys, end), _view(self.values, end)))
            done += take
        out = self.keys_and_values()
        _publish(out[0], views, unmasked=False)
        return out


class ExactRotatingKVCache(RotatingKVCache):
    """mlx-lm's `RotatingKVCache` (a sliding-window layer's ring buffer, as plain decoding keeps
    it: keys in ring order, no mask); in a verify, written one row at a time as the decode step
    writes it, each row seeing the ring as it was then. A ring cannot be trimmed, so it keeps
    its state from before the verify and a rollback replays only the committed rows."""

    def __init__(self, max_size: int, keep: int = 0) -> None:
        super().__init__(max_size=max_size, keep=keep)
        self._before: tuple[Any, ...] | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._before = None
        if _PLAN.get() is None:
            return super().update_and_fetch(keys, values)
        held = (self.keys, self.values)
        snapshot = [None if a is None else _view(a, a.shape[2]) for a in held]
        self._before = (*snapshot, self.offset, self._idx, keys, values)
        views = []
        for i in range(keys.shape[2]):
            k, v = super().update_and_fetch(keys[:, :, i : i + 1], values[:, :, i : i + 1])
            views.append((_view(k, k.shape[2]), _view(v, v.shape[2])))
        _publish(k, views, unmasked=True)
        return k, v

    def trim(self, n: int) -> int:
        if self._before is None or n <= 0:
            return super().trim(n)
        k, v, self.offset, self._idx, new_k, new_v = self._before
        self.keys, self.values, self._before = k, v, None
        for i in range(new_k.shape[2] - n):  # replay the committed rows
            super().update_and_fetch(new_k[:, :, i : i + 1], new_v[:, :, i : i + 1])
        return n


def _row_mask(mask: Any, i: int, keys: int) -> Any:
    """The mask of query row `i` alone: a decode step over a full-attention layer has none (a
    causal string or no mask); an array mask keeps row i over that row's keys."""
    if mask is None or isinstance(mask, str):
        return None
    return mask[..., i : i + 1, :keys]


def _per_row_attention(scope: dict[str, Any]) -> Callable[..., mx.array]:
    """The attention function `scope` (an mlx-lm model module) names, one call per query row
    over the row's own prefix when its keys come from a verify's exact cache; unchanged
    otherwise."""
    signature = inspect.signature(scope[SDPA])

    def call(*args: Any, **kwargs: Any) -> mx.array:
        sdpa = scope[SDPA]  # looked up per call, as the layer's own code would
        active = _PLAN.get()
        given = signature.bind(*args, **kwargs).arguments
        found = None if active is None else active[1].rows.get(id(given["keys"]))
        queries = given["queries"]
        if found is None or len(found[0]) != queries.shape[2]:
            return sdpa(*args, **kwargs)
        views, unmasked = found
        out = []
        for i, (k, v) in enumerate(views):
            mask = None if unmasked else _row_mask(given.get("mask"), i, k.shape[2])
            one = given | {"queries": queries[:, :, i : i + 1], "keys": k, "values": v}
            out.append(sdpa(**(one | {"mask": mask})))
        return mx.concatenate(out, axis=2)

    return call


def _row_attention(base: type) -> type:
    if base not in _ROW_CLASSES:
        method = base.__call__
        wrapped = _rebound(method, SDPA, _per_row_attention(method.__globals__))
        _ROW_CLASSES[base] = type(f"Rows{base.__name__}", (base,), {"__call__": wrapped})
    return _ROW_CLASSES[base]


def _calls_sdpa(cls: type) -> bool:
    method = cls.__call__  # a class always has one; mlx-lm's attention defines its own
    code = getattr(method, "__code__", None)
    return code is not None and SDPA in code.co_names and SDPA in method.__globals__


# ----------------------------------------------------------------------------- the target side
@dataclass
class ExactVerify:
    """A target's exact-verify settings: its row `plan`, and how many attention layers were
    hooked."""

    plan: RowPlan
    attention_layers: int = 0

    @classmethod
    def prepare(cls, model: nn.Module, plan: RowPlan, head: nn.Module) -> ExactVerify:
        """Hook `model` (a weight-sharing copy: classes are swapped in place) for `plan`:
        its matmuls, its attention layers and `head`, the output projection's module. The
        hooks do anything only inside `rows(plan)`."""
        exact = cls(plan)
        for module in [m for _, m in model.named_modules()] + [head]:
            cls_ = type(module)
            if cls_ in _ROW_CLASSES.values():
                continue
            if isinstance(module, nn.Linear | nn.QuantizedLinear):
                module.__class__ = _row_linear(cls_)
            elif isinstance(module, nn.Embedding | nn.QuantizedEmbedding) and module is head:
                module.__class__ = _row_embedding(cls_)
            elif _calls_sdpa(cls_):
                module.__class__ = _row_attention(cls_)
                exact.attention_layers += 1
        return exact

    @staticmethod
    def rows_of(exact: ExactVerify | None) -> contextlib.AbstractContextManager[None]:
        """The context a verify forward runs in: `exact`'s plan, or none."""
        return rows(None if exact is None else exact.plan)

    @staticmethod
    def kv_cache(like: Any) -> Any:
        """The exact counterpart of an attention layer's mlx-lm cache `like`: a `KVCache`, or a
        sliding window's `RotatingKVCache` (plain decoding reads its keys in ring order, so
        the ring stays; a verify writes it row by row and a rollback replays)."""
        if isinstance(like, RotatingKVCache):
            return ExactRotatingKVCache(max_size=like.max_size, keep=like.keep)
        return ExactKVCache()

    @staticmethod
    def prefill_ends(n: int) -> list[int]:
        """Where mlx-lm's `generate_step` ends its prefill chunks of an n-token prompt: 2048 at
        a time up to the last token, which is a step of its own (the decode step's shapes)."""
        ends = list(range(MLX_LM_PREFILL_STEP, n - 1, MLX_LM_PREFILL_STEP))
        return ends + ([n - 1] if n > 1 else []) + [n]

    def describe(self) -> str:
        return f"--exact: verify rows as the decode step computes them ({self.plan.describe()})"


def decode_scores(logits: mx.array) -> mx.array:
    """What mlx-lm's sampler picks from, per row of `logits` [K, V]: the row minus its
    logsumexp, each computed on the row alone ([1, V], as `generate_step` does). Subtracting
    rounds, so two logits one ulp apart can tie here, and mlx-lm then picks the lower id."""
    one_row = (logits[i : i + 1] for i in range(logits.shape[0]))
    return mx.concatenate([r - mx.logsumexp(r, keepdims=True) for r in one_row], axis=0)
