"""What exact rollback of a hybrid target's recurrent layers costs (`bench --synthetic` on a
hybrid shape), and what the two ways of keeping a Gated DeltaNet recurrence cost here.

- **verify**: the verify forward as the loop runs it (recurrent layers keep what rollback
  needs, `recurrent.py`) against mlx-lm's own forward of the same rows: what recording costs.
- **rollback**: `Target.rollback` of half the rows after such a forward, evaluated (a replay
  of the kept rows where the loop replays).
- **the Gated DeltaNet update alone**, for every such layer at its shapes, from a state of its
  shape: one call over all rows (mlx-lm's verify), one row a call (per-position states), and
  one call over half the rows (a replay). Per-position states cost the second minus the first
  on every verify; replay costs the third on every round that rejected drafts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from ..recurrent import RecurrentCache
from ..target import Target


def _median_ms(run: Callable[[], Any], reps: int, before: Callable[[], None] = lambda: None):
    """Median of `reps` timed `run` calls (each evaluated), `before` untimed ahead of each;
    one warm call first."""
    times = []
    for i in range(reps + 1):
        before()
        t = time.perf_counter()
        mx.eval(run())
        if i:
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


class _Position:
    """The caches' state now, to come back to between timed calls (timing only)."""

    def __init__(self, cache: list[Any]):
        self.cache = cache
        self.saved = [
            (c.offset, list(c.cache) if isinstance(c, RecurrentCache) else None) for c in cache
        ]

    def back(self) -> None:
        for c, (offset, arrays) in zip(self.cache, self.saved):
            if arrays is None:
                c.trim(c.offset - offset)
            else:
                c.cache, c.offset, c.record = list(arrays), offset, None


def _gated_delta_layers(target: Target) -> list[Any]:
    return [m for _, m in target.inner.named_modules() if hasattr(m, "num_k_heads")]


def _update_ms(target: Target, rows: int, reps: int, one_at_a_time: bool) -> float | None:
    """mlx-lm's `gated_delta_update` over `rows` positions for every Gated DeltaNet layer, from
    a state of its shape, in one call or one row a call (chaining the state)."""
    from mlx_lm.models.gated_delta import gated_delta_update

    layers = _gated_delta_layers(target)
    if not layers:
        return None
    dtype = target.embed_tokens(mx.array([0])).dtype
    calls = []
    for m in layers:
        hk, dk, hv, dv = m.num_k_heads, m.head_k_dim, m.num_v_heads, m.head_v_dim
        q, k = (mx.random.normal((1, rows, hk, dk)).astype(dtype) for _ in range(2))
        v = mx.random.normal((1, rows, hv, dv)).astype(dtype)
        a, b = (mx.random.normal((1, rows, hv)).astype(dtype) for _ in range(2))
        state = mx.random.normal((1, hv, dv, dk)) * 0.1
        calls.append((q, k, v, a, b, m.A_log, m.dt_bias, state))
    mx.eval(calls)

    def run() -> list[mx.array]:
        out = []
        for q, k, v, a, b, A_log, dt_bias, state in calls:
            if not one_at_a_time:
                out.append(gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)[1])
                continue
            for t in range(rows):
                row = slice(t, t + 1)
                _, state = gated_delta_update(
                    q[:, row], k[:, row], v[:, row], a[:, row], b[:, row], A_log, dt_bias, state
                )
            out.append(state)
        return out

    return _median_ms(run, reps)


def recurrent_costs(
    target: Target, context_len: int, width: int = 8, reps: int = 10
) -> dict[str, Any]:
    """Time a verify of `width` rows on a `context_len` context with and without the recording,
    the rollback of half of it, and the replay alternative (ms, medians)."""
    ids = mx.random.randint(0, target.vocab_size, (context_len + width,), key=mx.random.key(0))
    ids = ids.astype(mx.int32)
    cache = target.make_cache()
    target.prefill(ids[:context_len], cache)
    at = _Position(cache)
    rows = ids[context_len:]

    def recorded() -> list[mx.array]:
        logits, _ = target(rows, cache)
        return [logits, *(c.state for c in cache)]

    def plain() -> list[mx.array]:  # mlx-lm's own forward: one update call over all rows
        logits, _ = target._logits(rows, cache, False)
        return [logits, *(c.state for c in cache)]

    def verified() -> None:
        at.back()
        mx.eval(recorded())

    keep = width // 2

    def rollback() -> list[Any]:
        Target.rollback(cache, width - keep)
        return [c.state for c in cache]

    out: dict[str, Any] = {
        "width": width,
        "context": context_len,
        "recurrent_layers": target.recurrent_layers,
        "verify_recorded_ms": _median_ms(recorded, reps, at.back),
        "verify_plain_ms": _median_ms(plain, reps, at.back),
        "rollback_ms": _median_ms(rollback, reps, verified),
    }
    at.back()
    one_call = _update_ms(target, width, reps, one_at_a_time=False)
    if one_call is not None:
        out["update_one_call_ms"] = one_call
        out["update_row_by_row_ms"] = _update_ms(target, width, reps, one_at_a_time=True)
        out["update_replay_ms"] = _update_ms(target, keep, reps, one_at_a_time=False)
    overhead = max(out["verify_recorded_ms"] - out["verify_plain_ms"], 0.0)
    out["share"] = (overhead + out["rollback_ms"]) / out["verify_recorded_ms"]
    return out


def rollback_table(c: dict[str, Any]) -> str:
    """The measurement as a Markdown table, with what each number means."""
    from .report import fmt_table

    header = ["verify (as run) ms", "verify (mlx-lm) ms", "rollback ms", "share of verify"]
    body = [
        c["verify_recorded_ms"],
        c["verify_plain_ms"],
        c["rollback_ms"],
        f"{100 * c['share']:.1f}%",
    ]
    keep = c["width"] // 2
    if "update_one_call_ms" in c:
        header += [
            f"GDN update: {c['width']} rows, 1 call",
            f"{c['width']} rows, 1 a call",
            f"{keep} rows (replay)",
        ]
        body += [c["update_one_call_ms"], c["update_row_by_row_ms"], c["update_replay_ms"]]
    return (
        f"recurrent rollback ({c['recurrent_layers']} layers, verify of {c['width']} rows on "
        f"{c['context']} tokens, rollback of {c['width'] - keep}):\n"
        + fmt_table(header, [body])
        + "\nas run = the loop's verify (recording what rollback needs); mlx-lm = the same rows "
        "through mlx-lm's own layers; share = (as run - mlx-lm + rollback) / as run; GDN update "
        "= mlx-lm's gated_delta_update for every Gated DeltaNet layer, ms: per-position states "
        "add (1 a call - 1 call) to every verify, replay adds its own time to a rejecting round"
    )
