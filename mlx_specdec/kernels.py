"""CPU stand-ins for `mx.fast.rms_norm` and `mx.fast.rope`, bit-identical to them.

On MLX's CPU backend these two run as chains of small ops, several times the cost of one
compiled kernel, and a decode step makes four norms and two RoPEs per layer: on a small model
they are most of the step. The stand-ins below give the same float32 results bit for bit (same
operations in the same order, one compiled kernel; the tests check equality, not closeness), so
swapping them in changes speed only. Other dtypes, partial rotary dims and array offsets go to
`mx.fast` unchanged.

`stand_ins_available()` says whether they work here; `weight_sharing_copy(model, stand_ins=True)`
gives a copy of a model that shares its weights and runs them (the model itself is left as it
was, so mlx-lm's own decoding of the target stays the baseline). Modules are built with mlx's own
norm and RoPE; the stand-ins are swapped in only on such copies.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@cache
def stand_ins_available() -> bool:
    """Do the stand-ins pay and work here? They need the CPU backend and a working kernel
    compiler (MLX builds CPU kernels with the system's C++ compiler)."""
    if mx.default_device() != mx.cpu:
        return False
    try:
        mx.eval(mx.compile(lambda x: x * 2.0 + 1.0)(mx.ones((2,))))
    except Exception:  # no compiler: the plain ops still work
        return False
    return True


@mx.compile
def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    xf = x.astype(mx.float32)
    normed = xf * mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
    return weight * normed.astype(mx.result_type(x, weight))


class CompiledRMSNorm(nn.RMSNorm):
    """nn.RMSNorm as one compiled kernel for float32 input (other dtypes: mx.fast)."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float32:
            return super().__call__(x)
        return _rms_norm(x, self.weight, self.eps)


@mx.compile
def _rotate_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


# cos/sin tables by (dims, base), shared by every TableRoPE of a process (target and drafter).
_ROPE_TABLES: dict[tuple[int, float], tuple[mx.array, mx.array]] = {}


class TableRoPE(nn.Module):
    """nn.RoPE (rotate-half, scale 1) from a cos/sin table of positions, grown on demand: a
    slice and one compiled kernel per float32 call. The frequencies are computed as mx.fast.rope
    computes them, exp(-i * log(base) / (dims / 2)), which makes the table bit-identical."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self._dims, self._base = dims, base
        half = dims // 2
        # In float32 throughout, as mx.fast.rope computes them (a log in double precision
        # rounds differently when `half` is not a power of two).
        scale = mx.log(mx.array(base, dtype=mx.float32)) / half
        self._inv_freq = mx.exp(-mx.arange(half, dtype=mx.float32) * scale)
        mx.eval(self._inv_freq)  # not lazy: a server decodes on another thread

    def _table(self, end: int) -> tuple[mx.array, mx.array]:
        key = (self._dims, self._base)
        table = _ROPE_TABLES.get(key)
        if table is None or table[0].shape[0] < end:
            rows = max(end + end // 2, 256)  # grown by half again: few rebuilds, little waste
            angles = mx.arange(rows, dtype=mx.float32)[:, None] * self._inv_freq
            table = (mx.cos(angles), mx.sin(angles))
            mx.eval(table)  # evaluated before it is shared
            _ROPE_TABLES[key] = table
        return table

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        if x.dtype != mx.float32 or x.shape[-1] != self._dims or not isinstance(offset, int):
            return mx.fast.rope(
                x, self._dims, traditional=False, base=self._base, scale=1.0, offset=offset
            )
        end = offset + x.shape[-2]
        cos, sin = self._table(end)
        return _rotate_half(x, cos[offset:end], sin[offset:end])


def _stand_in(module: nn.Module) -> nn.Module | None:
    """The stand-in for one of mlx's own norm/RoPE modules (None: keep the module)."""
    if type(module) is nn.RMSNorm:
        fast = copy.copy(module)  # same weight array and eps
        fast.__class__ = CompiledRMSNorm
        return fast
    rope = type(module) is nn.RoPE
    if rope and not module.traditional and module.scale == 1.0 and module.base is not None:
        return TableRoPE(module.dims, float(module.base))
    return None


def weight_sharing_copy(model: nn.Module, *, stand_ins: bool) -> nn.Module:
    """A copy of `model`'s module tree holding the same weight arrays (no memory is copied),
    with the stand-ins in place of nn.RMSNorm/nn.RoPE if `stand_ins`. The original is not
    modified, so classes can be swapped on the copy (layer taps) without touching it."""
    copies: dict[int, Any] = {}  # one copy per module, so shared submodules stay shared

    def visit(value: Any) -> Any:
        if isinstance(value, nn.Module):
            if id(value) not in copies:
                new = _stand_in(value) if stand_ins else None
                if new is None:
                    new = copy.copy(value)
                    for key, child in value.items():
                        new[key] = visit(child)
                copies[id(value)] = new
            return copies[id(value)]
        if isinstance(value, list | tuple):
            return type(value)(visit(v) for v in value)
        if isinstance(value, dict):
            return {k: visit(v) for k, v in value.items()}
        return value

    return visit(model)
