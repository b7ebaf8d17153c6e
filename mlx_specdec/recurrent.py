"""Recurrent layers (Gated DeltaNet, Mamba-2, short convolutions) rolled back exactly.

A recurrent layer's cache is a state, not rows, so it cannot be trimmed: after a verify of T
positions it holds the state after all of them, and the loop needs the state after the
committed ones. So during a verify forward the recognised layers keep what rolling back needs:

- the whole input of their causal depthwise convolution (the window before the round, then the
  T new rows), so the window after any position is a slice of it;
- for a recurrence (the delta rule, the SSM), the state after every position. The layer's own
  mlx-lm update function (`gated_delta_update`, `ssm_update`) is called one position at a time,
  as plain decoding calls it, chaining the states.

Rolling back n positions then picks the window and the state at position T - n: no compute and
no second forward. Each kept state is what mlx-lm's decoding of the committed tokens computes,
bit for bit on the CPU (`tests/test_hybrid_rollback.py` checks the states themselves).

How it hooks in, without copying any of mlx-lm's layer code: on the Target's weight-sharing copy
(never on the caller's model) a recognised layer's class is swapped for a subclass whose method
is mlx-lm's own, with the update function it names rebound to a stepwise wrapper; the conv
module's class gets a subclass that records its input. Both do anything only while a layer runs
on an *armed* `RecurrentCache` (`armed(cache)`, which the Target's verify forward holds);
otherwise, as in prefill and training, mlx-lm's functions run unchanged. The wrapper passes every
argument through by name, so keywords mlx-lm adds later reach the update untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache

from .errors import SpecDecError


@dataclass(frozen=True)
class _Kind:
    """How one mlx-lm layer class keeps its recurrent state."""

    conv: str  # the attribute holding its causal depthwise conv (cache slot 0: the window)
    method: str | None = None  # the method that calls the recurrence (None: a conv only)
    update: str | None = None  # the module-level name of the update function it calls
    per_position: tuple[str, ...] = ()  # the update's arguments with a time axis (axis 1)
    state: str = "state"  # the update's state argument (cache slot 1)


_GATED_DELTA = _Kind("conv1d", "__call__", "gated_delta_update", ("q", "k", "v", "a", "b", "mask"))
_MAMBA2 = _Kind("conv1d", "_ssm", "ssm_update", ("hidden_states", "B", "C", "dt", "mask"))
_SHORT_CONV = _Kind("conv")

# mlx-lm layer classes (module.qualname) whose state rolls back exactly.
KINDS: dict[str, _Kind] = {
    "mlx_lm.models.qwen3_5.GatedDeltaNet": _GATED_DELTA,  # also qwen3_5_moe
    "mlx_lm.models.qwen3_next.Qwen3NextGatedDeltaNet": _GATED_DELTA,
    "mlx_lm.models.nemotron_h.NemotronHMamba2Mixer": _MAMBA2,
    "mlx_lm.models.lfm2.ShortConv": _SHORT_CONV,
    "mlx_lm.models.lfm2_moe.ShortConv": _SHORT_CONV,
}


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------ the cache
@dataclass(eq=False)
class _Record:
    """What one armed forward of one layer kept: its conv input and its states."""

    conv_input: mx.array | None = None  # [B, window + T, C]
    states: list[Any] = field(default_factory=list)  # before the forward, then after each row


class RecurrentCache(ArraysCache):
    """mlx-lm's `ArraysCache` (slot 0 the conv window, slot 1 the recurrent state if any), which
    also counts the positions it holds (`offset`) and keeps, from its last armed forward, what
    `rollback` needs. mlx-lm's layers use it as their own cache.

    Its state is valid at one position, `offset`. For prefix snapshots, `keep(at)` makes it also
    keep (`kept`) its state at position `at` once a forward ends there (a prompt but its last
    token), and at the starts of the last two verify forwards it rolled back (the drafter's
    context ends at one of them after a run: it has not seen the last round's rows, nor the
    round before when the last was a plain step)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.offset = 0
        self.armed = False
        self.record: _Record | None = None
        self.kept: dict[int, list[Any]] = {}
        self._keep_at: int | None = None  # None: keep nothing
        self._starts: list[int] = []  # the last two verify forwards' first positions

    def keep(self, at: int) -> None:
        self._keep_at = at

    def advance(self, n: int) -> None:
        super().advance(n)  # the layer has stored its new window and state
        self.offset += n
        if self.offset == self._keep_at:
            self.kept[self.offset] = list(self.cache)

    def positions(self) -> set[int]:
        """Where `state_at` can give this layer's state."""
        return {self.offset, *self.kept}

    def state_at(self, n: int) -> list[mx.array]:
        """The arrays (conv window, state) this layer holds after `n` positions."""
        arrays = self.cache if n == self.offset else self.kept.get(n)
        if arrays is None:
            raise SpecDecError(
                f"a recurrent layer holds its state after {self.offset} positions, not {n}: it "
                "cannot be cut at another position"
            )
        return [a for a in arrays if a is not None]

    def fill(self, arrays: Sequence[mx.array], n: int) -> None:
        """Hold `arrays` (from `state_at`) as the state after `n` positions."""
        if len(arrays) != len(self.cache):
            raise SpecDecError(
                f"a recurrent layer holds {len(self.cache)} arrays, not {len(arrays)}"
            )
        self.cache, self.offset, self.record = list(arrays), n, None
        self.kept, self._starts = {}, []

    def rollback(self, n: int) -> None:
        """Drop the last `n` positions of the last armed forward (0: keep them all); the record
        (its memory) goes either way."""
        rec, self.record = self.record, None
        conv_input = None if rec is None else rec.conv_input
        window = 0 if conv_input is None else self[0].shape[1]
        added = 0 if conv_input is None else conv_input.shape[1] - window
        if n > added:
            raise SpecDecError(
                f"a recurrent layer can roll back only the {added} positions of its last "
                f"verify forward, not {n}"
            )
        if added == 0:
            return
        assert rec is not None and conv_input is not None
        if self._keep_at is not None:  # the state before that forward, for a snapshot
            self._starts = [*self._starts[-1:], self.offset - added]
            wanted = {self._keep_at, *self._starts}
            self.kept = {p: a for p, a in self.kept.items() if p in wanted}
            self.kept[self._starts[-1]] = [mx.contiguous(conv_input[:, :window]), *rec.states[:1]]
        if n <= 0:
            return
        keep = added - n
        self[0] = mx.contiguous(conv_input[:, keep : keep + window])
        if rec.states:
            self[1] = rec.states[keep]
        self.offset -= n


@contextlib.contextmanager
def armed(caches: Sequence[Any]) -> Iterator[None]:
    """While the block runs (building a forward's graph), the recurrent caches in `caches` keep
    what rolling back needs; each starts a new record."""
    ours = [c for c in caches if isinstance(c, RecurrentCache)]
    for c in ours:
        c.armed, c.record = True, _Record()
    try:
        yield
    finally:
        for c in ours:
            c.armed = False


# --------------------------------------------------------------------------- recording layers
_ACTIVE: ContextVar[_Record | None] = ContextVar("mlx_specdec_recurrent_record", default=None)


def _stepwise(update: Any, kind: _Kind) -> Any:
    """`update` (mlx-lm's recurrence), run one position at a time while a record is active,
    keeping the state after each; unchanged otherwise."""
    names = list(inspect.signature(update).parameters)

    def run(*args: Any, **kwargs: Any) -> Any:
        rec = _ACTIVE.get()
        if rec is None:
            return update(*args, **kwargs)
        given = dict(zip(names, args)) | kwargs
        state = given.pop(kind.state, None)
        steps = given[kind.per_position[0]].shape[1]
        ys, states = [], [state]
        for t in range(steps):
            at_t = {
                k: v[:, t : t + 1] if k in kind.per_position and v is not None else v
                for k, v in given.items()
            }
            y, state = update(**at_t, **{kind.state: state})
            ys.append(y)
            states.append(state)
        rec.states = states
        return mx.concatenate(ys, axis=1), state

    return run


def _rebound(fn: types.FunctionType, name: str, value: Any) -> types.FunctionType:
    """`fn` itself (its code) seeing `value` as the global `name`: mlx-lm's method calls our
    wrapper, and neither the method nor its module is changed."""
    scope = dict(fn.__globals__)
    scope[name] = value
    out = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


_RECORDING: dict[type, type] = {}


def _recording_conv(base: type) -> type:
    if base not in _RECORDING:

        def __call__(self: Any, x: mx.array) -> mx.array:
            rec = _ACTIVE.get()
            if rec is not None:
                rec.conv_input = x  # the window before the forward, then the new rows
            return base.__call__(self, x)

        _RECORDING[base] = type(f"Recording{base.__name__}", (base,), {"__call__": __call__})
    return _RECORDING[base]


def _recording_layer(base: type, kind: _Kind) -> type:
    if base not in _RECORDING:
        attrs: dict[str, Any] = {}
        inner = base.__call__
        if kind.method is not None and kind.update is not None:
            method = getattr(base, kind.method)
            update = method.__globals__[kind.update]
            method = _rebound(method, kind.update, _stepwise(update, kind))
            if kind.method == "__call__":
                inner = method
            else:
                attrs[kind.method] = method
        params = list(inspect.signature(base.__call__).parameters)[1:]
        at = params.index("cache")

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            cache = kwargs.get("cache", args[at] if len(args) > at else None)
            if not (isinstance(cache, RecurrentCache) and cache.armed):
                return base.__call__(self, *args, **kwargs)
            token = _ACTIVE.set(cache.record)
            try:
                return inner(self, *args, **kwargs)
            finally:
                _ACTIVE.reset(token)

        attrs["__call__"] = __call__
        _RECORDING[base] = type(f"Recording{base.__name__}", (base,), attrs)
    return _RECORDING[base]


def prepare(model: nn.Module) -> int:
    """Make every recognised recurrent layer of `model` (a weight-sharing copy: classes are
    swapped in place) keep what rollback needs on an armed cache. Returns how many there are."""
    count = 0
    for _, module in model.named_modules():
        kind = KINDS.get(_name(type(module)))
        if kind is None:
            continue
        conv = getattr(module, kind.conv)
        conv.__class__ = _recording_conv(type(conv))
        module.__class__ = _recording_layer(type(module), kind)
        count += 1
    return count
