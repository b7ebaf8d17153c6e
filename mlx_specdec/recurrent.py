"""Recurrent layers (Gated DeltaNet, Mamba-2, short convolutions) rolled back exactly.

A recurrent layer's cache is a state, not rows, so it cannot be trimmed: after a verify of T
positions it holds the state after all of them, and the loop needs the state after the
committed ones. So during a verify forward the recognised layers keep what rolling back needs:

- the whole input of their causal depthwise convolution (the window before the round, then the
  T new rows): the window after any position is a slice of it;
- for the recurrence, one of two things (`_replays`):
  - **per-position states**: the verify calls the layer's mlx-lm update function
    (`gated_delta_update`, `ssm_update`) one row at a time, as plain decoding calls it, and
    keeps the state after each row; rolling back picks one. Used where the update runs row by
    row anyway (CPU, CUDA: the extra cost is per-row setup), and always for Mamba-2, whose
    several-row form is a chunked closed form that rounds differently from row-by-row decoding.
  - **replay** (Gated DeltaNet on Metal): the verify runs the update as mlx-lm does, all rows in
    one fused kernel that keeps the state on chip; rollback to k < T rows calls it again over
    those k rows from the state before the round (the inputs are kept). Row by row, the state
    would go through memory once a row; a replay moves it twice, and only when drafts were
    rejected.

Either way the state after rollback is what mlx-lm's plain decoding of the committed tokens
computes, bit for bit on the CPU (`tests/test_hybrid_rollback.py` checks the states
themselves), with no second forward of the target. What each costs: docs/design.md.

How it hooks in, without copying any of mlx-lm's layer code: on the Target's weight-sharing copy
(never on the caller's model) a recognised layer's class is swapped for a subclass whose method
is mlx-lm's own, with the update function it names rebound to a recording wrapper; the conv
module's class gets a subclass that records its input. Both do anything only while a layer runs
on an *armed* `RecurrentCache` (`armed(cache)`, which the Target's verify forward holds);
otherwise, as in prefill and training, mlx-lm's functions run unchanged. The wrapper passes every
argument through by name, so keywords mlx-lm adds later reach the update untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
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
    can_replay: bool = True  # may replay the update at rollback (`_replays`)


_GATED_DELTA = _Kind("conv1d", "__call__", "gated_delta_update", ("q", "k", "v", "a", "b", "mask"))
_MAMBA2 = _Kind(
    "conv1d", "_ssm", "ssm_update", ("hidden_states", "B", "C", "dt", "mask"), can_replay=False
)
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
    """What one armed forward of one layer kept to roll back: its conv input, and its state
    before the forward with either the state after every row or how to replay rows."""

    conv_input: mx.array | None = None  # [B, window + T, C]
    before: Any = None  # the recurrent state before the forward
    states: list[Any] = field(default_factory=list)  # per-position: after rows 1..T
    replay: Callable[[int], mx.array] | None = None  # replay: k -> the state after k rows

    def state_after(self, k: int) -> Any:
        if k == 0:
            return self.before
        if self.states:
            return self.states[k - 1]
        assert self.replay is not None
        return self.replay(k)


class RecurrentCache(ArraysCache):
    """mlx-lm's `ArraysCache` (slot 0 the conv window, slot 1 the recurrent state if any), which
    also counts the positions it holds (`offset`) and keeps, from its last armed forward, what
    `rollback` needs. mlx-lm's layers use it as their own cache.

    Its state is valid at one position, `offset`. For prefix snapshots, `keep(*at)` makes it also
    keep (`kept`) its state at those positions once a forward ends there (`Target.prefill` ends
    chunks there: a prompt's last turn start, all but its last token), and at the starts of the
    last two verify forwards it rolled back (the drafter's context ends at one of them after a
    run: it has not seen the last round's rows, nor the round before's after a plain step)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.offset = 0
        self.armed = False
        self.record: _Record | None = None
        self.kept: dict[int, list[Any]] = {}
        self.wanted: frozenset[int] = frozenset()  # positions to keep the state at
        self._starts: list[int] = []  # the last two verify forwards' first positions

    def keep(self, *at: int) -> None:
        self.wanted = frozenset(at)

    def advance(self, n: int) -> None:
        super().advance(n)  # the layer has stored its new window and state
        self.offset += n
        if self.offset in self.wanted:
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
        if self.wanted:  # the state before that forward, for a snapshot
            self._starts = [*self._starts[-1:], self.offset - added]
            wanted = {*self.wanted, *self._starts}
            self.kept = {p: a for p, a in self.kept.items() if p in wanted}
            start = [mx.contiguous(conv_input[:, :window]), rec.before]
            self.kept[self._starts[-1]] = start[: len(self.cache)]
        if n <= 0:
            return
        keep = added - n
        self[0] = mx.contiguous(conv_input[:, keep : keep + window])
        if len(self.cache) > 1:
            self[1] = rec.state_after(keep)
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


def _rows(given: dict[str, Any], kind: _Kind, rows: slice) -> dict[str, Any]:
    """The update's arguments for some rows only (the others as given)."""
    return {
        k: v[:, rows] if k in kind.per_position and v is not None else v for k, v in given.items()
    }


REPLAY: bool | None = None  # None: where it pays (`_replays`); tests set it to run both ways


def _replays(kind: _Kind) -> bool:
    """Replay rather than keep per-position states: where mlx-lm's update is one fused kernel
    (Metal), unless `REPLAY` says otherwise."""
    if not kind.can_replay:
        return False
    if REPLAY is not None:
        return REPLAY
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def _recording(update: Any, kind: _Kind) -> Any:
    """`update` (mlx-lm's recurrence) while a record is active: replayable, or one position at
    a time keeping each state (`_replays`); unchanged otherwise."""
    names = list(inspect.signature(update).parameters)

    def run(*args: Any, **kwargs: Any) -> Any:
        rec = _ACTIVE.get()
        if rec is None:
            return update(*args, **kwargs)
        given = dict(zip(names, args)) | kwargs
        rec.before = given.get(kind.state)
        if _replays(kind):
            rec.replay = lambda k: update(**_rows(given, kind, slice(0, k)))[1]
            return update(**given)
        ys = []
        for t in range(given[kind.per_position[0]].shape[1]):
            y, given[kind.state] = update(**_rows(given, kind, slice(t, t + 1)))
            ys.append(y)
            rec.states.append(given[kind.state])
        return mx.concatenate(ys, axis=1), given[kind.state]

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
            method = _rebound(method, kind.update, _recording(update, kind))
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
