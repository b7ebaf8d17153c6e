"""The runtime draft cap (`--max-draft auto`): a measured cost model and a per-machine cache.

The cost model times one target forward of K = 1..16 tokens and one drafter round per cap at a
given context length; predicted tok/s per cap = A(cap) / (t_draft(cap) + t_verify(cap+1)), where
A(cap) is the expected tokens a round commits given the acceptance survival curve.
`auto_max_draft` picks the cap from it and caches the choice per model, precision and machine
(`mlx-specdec bench` refines the cached acceptance with what it observed).

Sits below `generate.py`: nothing here imports `generate` or `bench`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .drafters.base import Drafter
from .errors import SpecDecError
from .prefix_cache import fingerprint
from .sampling import SamplingParams
from .target import Target

PRIOR_ACCEPT = 0.7  # per-position acceptance assumed before any run was observed
CACHE_VERSION = 1
AUTO_CONTEXT = 512  # context length (tokens) auto_max_draft times the components at
AUTO_BUDGET_S = 6.0  # seconds of timed repeats auto_max_draft may spend (see measure_costs)


# ================================================================================ machine
def _blas() -> str:
    """MLX's CPU BLAS: a preloaded OpenBLAS replaces the bundled one (mlx-lm notes A7)."""
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "openblas" in preload.lower() or "libopenblas" in maps:
        threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
        return f"OpenBLAS (preloaded, {threads} threads)"
    if platform.system() == "Darwin":
        return "Accelerate"
    return "bundled"


def machine_info() -> dict[str, str]:
    """What a measurement depends on: chip, backend, BLAS and versions (part of the cap cache
    key; `bench` prints and reports it)."""
    import mlx_lm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if mx.metal.is_available():
        backend = "Metal"
    elif mx.cuda.is_available():
        backend = "CUDA"
    else:
        backend = "CPU"
    chip = cpu
    if backend != "CPU":
        with contextlib.suppress(Exception):  # a name is only decoration
            chip = str(mx.device_info().get("device_name", cpu))
    return {
        "chip": chip,
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
        "backend": backend,
        "device": str(mx.default_device()),
        "blas": _blas(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
    }


# ================================================================================ cost model
def expected_accept(survival: Sequence[float], cap: int) -> float:
    """Expected tokens committed per round at `cap`: 1 + sum_{k<=cap} P(at least k accepted).

    `survival[k-1]` = P(at least k drafts accepted), observed up to some cap; further positions
    continue geometrically at the last observed conditional rate.
    """
    s = [min(max(float(x), 0.0), 1.0) for x in survival]
    if not s:
        s = [PRIOR_ACCEPT]
    while len(s) < cap:
        rate = s[-1] / s[-2] if len(s) > 1 and s[-2] > 0 else s[-1]
        s.append(s[-1] * min(rate, 1.0))
    return 1.0 + sum(s[:cap])


def survival_from_rounds(accepted: Sequence[int], cap: int) -> list[float]:
    """P(at least k drafts accepted), k = 1..cap, from rounds that proposed `cap` drafts."""
    if not accepted:
        return []
    return [sum(a >= k for a in accepted) / len(accepted) for k in range(1, cap + 1)]


def geometric_survival(p: float, cap: int) -> list[float]:
    return [p**k for k in range(1, cap + 1)]


@dataclass
class CostModel:
    """Measured component times (ms) at one context length."""

    context_len: int
    verify_ms: dict[int, float]  # K tokens in one target forward -> ms
    draft_ms: dict[int, float] = field(default_factory=dict)  # cap -> drafter ms per round

    def round_ms(self, cap: int) -> float:
        return self.draft_ms.get(cap, 0.0) + self.verify_ms[cap + 1]

    def predicted_tps(self, cap: int, accept_len: float) -> float:
        """tok/s ~ A / (t_draft + t_verify(cap+1)): what the loop would do with zero overhead."""
        return 1000.0 * accept_len / self.round_ms(cap)

    @property
    def baseline_tps(self) -> float:
        return 1000.0 / self.verify_ms[1]

    def caps(self) -> list[int]:
        return sorted(c for c in self.draft_ms if c + 1 in self.verify_ms)

    def table(self, survival: Sequence[float]) -> list[dict[str, float]]:
        rows = []
        for cap in self.caps():
            a = expected_accept(survival, cap)
            tps = self.predicted_tps(cap, a)
            rows.append(
                dict(
                    cap=cap,
                    draft_ms=self.draft_ms[cap],
                    verify_ms=self.verify_ms[cap + 1],
                    accept_len=a,
                    tok_s=tps,
                    speedup=tps / self.baseline_tps,
                )
            )
        return rows

    def best_cap(self, survival: Sequence[float]) -> int:
        rows = self.table(survival)
        if not rows:
            raise SpecDecError("the cost model has no drafter times: nothing to pick a cap from")
        return int(max(rows, key=lambda r: r["tok_s"])["cap"])

    def to_json(self) -> dict[str, Any]:
        return {
            "context_len": self.context_len,
            "verify_ms": {str(k): v for k, v in self.verify_ms.items()},
            "draft_ms": {str(k): v for k, v in self.draft_ms.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> CostModel | None:
        if not d:
            return None
        try:
            return cls(
                int(d["context_len"]),
                {int(k): float(v) for k, v in d["verify_ms"].items()},
                {int(k): float(v) for k, v in d["draft_ms"].items()},
            )
        except (KeyError, TypeError, ValueError):
            return None  # an old or damaged cache entry: measure again


def _median_ms(fn: Callable[[], Any], reps: int, seconds: float | None = None) -> float:
    """Median of `reps` timed calls after one warm call; with `seconds`, stop repeating once
    that much time was spent on this point (one timed call at least)."""
    start = time.perf_counter()
    mx.eval(fn())  # warm: first use of a shape may compile or allocate
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t) * 1000)
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
    return statistics.median(times)


def _rewind(state: Any, n: int) -> None:
    """Drop the last `n` context rows a drafter appended to its caches (timing only)."""
    if isinstance(state, list):
        for c in state:
            if hasattr(c, "trim"):
                c.trim(n)


def baseline_step_ms(target: Target, context_len: int, reps: int = 20) -> float:
    """Median time of one decode step of mlx-lm's own model (what the baseline runs, without
    this project's CPU kernels) on a context of `context_len` tokens."""
    from mlx_lm.models.cache import make_prompt_cache

    ids = mx.random.randint(0, target.vocab_size, (context_len + 1,), key=mx.random.key(0))
    cache = make_prompt_cache(target.model)
    mx.eval(target.model(ids[None, :context_len], cache=cache))

    def step() -> mx.array:
        logits = target.model(ids[None, context_len:], cache=cache)
        mx.eval(logits)
        for c in cache:  # a recurrent layer keeps the step: its cost does not grow with it
            if c.is_trimmable():
                c.trim(1)
        return logits

    return _median_ms(step, reps)


def measure_costs(
    target: Target,
    drafter: Drafter | None,
    context_len: int,
    *,
    context_rows: int = 3,
    max_width: int = 16,
    reps: int = 5,
    params: SamplingParams | None = None,
    budget_s: float | None = None,
) -> CostModel:
    """Time one target forward of K = 1..max(max_width, max_draft+1) tokens on a context of
    `context_len` tokens, and one drafter round per cap given `context_rows` new context rows
    (the rows a round commits, about the mean accept length).

    `budget_s` bounds the repeats: each point gets an equal share of it and stops repeating
    once its share is spent (a point always gets one warm and one timed call), so the whole
    measurement costs about max(budget_s, 2 calls per point) after the prefill."""
    params = params or SamplingParams()
    vocab = target.vocab_size
    widths = range(1, max(max_width, (drafter.max_draft + 1) if drafter else 1) + 1)
    points = len(widths) + (drafter.max_draft if drafter is not None else 0)
    share = budget_s / points if budget_s is not None else None
    key = mx.random.key(0)
    ids = mx.random.randint(0, vocab, (max(context_len, len(widths)),), key=key).astype(mx.int32)
    cache = target.make_cache()
    _, taps = target.prefill(ids[: max(context_len, 1)], cache)

    def forward(k: int) -> Callable[[], Any]:
        def run() -> list[mx.array]:
            logits, t = target(ids[:k], cache)
            out = [logits] + ([t] if t is not None else [])
            mx.eval(out)
            Target.rollback(cache, k)
            return out

        return run

    verify_ms = {k: _median_ms(forward(k), reps, share) for k in widths}
    draft_ms: dict[int, float] = {}
    if drafter is not None and taps is not None:
        state = drafter.new_state(target.padded_attention)  # as the loop makes it
        mx.eval(drafter.propose(state, taps, ids, 1, params).tokens)
        rows = max(1, min(context_rows, drafter.max_draft + 1))

        def propose(cap: int) -> Callable[[], Any]:
            def run() -> mx.array:
                tokens = drafter.propose(state, taps[:rows], ids[:rows], cap, params).tokens
                mx.eval(tokens)
                _rewind(state, rows)
                return tokens

            return run

        draft_ms = {c: _median_ms(propose(c), reps, share) for c in range(1, drafter.max_draft + 1)}
    return CostModel(context_len, verify_ms, draft_ms)


# ================================================================================ cap cache
def cache_file(folder: str | Path | None = None) -> Path:
    """The cap cache: max_draft.json in `folder`, by default ~/.cache/mlx-specdec (the CLI
    passes $MLX_SPECDEC_CACHE)."""
    return Path(folder or "~/.cache/mlx-specdec").expanduser() / "max_draft.json"


def _precision(target: Target) -> str:
    q = target.config.get("quantization") or target.config.get("quantization_config") or {}
    if isinstance(q, dict) and q.get("bits"):
        return f"{q['bits']}bit"
    return str(
        target.config.get("torch_dtype")
        or target.config.get("dtype")
        or target.embed_tokens.weight.dtype
    ).replace("mlx.core.", "")


def _drafter_tag(drafter: Drafter) -> str:
    """Drafter kind and precision (its quantization bits, else its dtype)."""
    if isinstance(drafter, nn.Module):
        for _, m in drafter.named_modules():
            if hasattr(m, "bits"):
                return f"{drafter.kind}:{m.bits}bit"
        params = tree_flatten(drafter.parameters())
        if params:
            return f"{drafter.kind}:{str(params[0][1].dtype).replace('mlx.core.', '')}"
    return drafter.kind


def _target_id(target: Target) -> str:
    """The target's name; a local folder by its absolute path, so that the same folder reached
    through another relative path shares the cached cap."""
    path = Path(target.name).expanduser()
    return str(path.resolve()) if path.is_dir() else target.name


def cap_cache_key(target: Target, drafter: Drafter, drafter_tag: str | None = None) -> str:
    """Model, precision and machine, readable; the pair's weight fingerprint, so that a folder
    whose weights were replaced (a retrained drafter, a new demo) is measured afresh. An exact
    verify (`--exact`) costs otherwise on a GPU, so it has its own entry."""
    m = machine_info()
    return "|".join(
        [
            _target_id(target),
            _precision(target) + ("+exact" if getattr(target, "exact", None) else ""),
            drafter_tag or _drafter_tag(drafter),
            fingerprint(target, drafter)[:12],
            m["chip"],
            m["backend"],
            m["blas"],
            f"mlx{m['mlx']}",
        ]
    )


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION
    return data.get("entries", {}) if ok else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only home must not break generation
        print(
            f"mlx-specdec: warning: cannot write the draft-cap cache {path}: {e}", file=sys.stderr
        )


def store_auto_cap(
    path: Path, key: str, costs: CostModel, survival: Sequence[float], cap: int
) -> None:
    """Record `cap` with the curves and survival it came from under `key` in the cache `path`."""
    entries = _read_cache(path)
    entries[key] = {
        "cap": cap,
        "survival": list(survival),
        "costs": costs.to_json(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_cache(path, entries)


def auto_max_draft(
    target: Target,
    drafter: Drafter,
    *,
    survival: Sequence[float] | None = None,
    context_len: int = AUTO_CONTEXT,
    drafter_tag: str | None = None,
    refresh: bool = False,
    budget_s: float | None = AUTO_BUDGET_S,
    notify: Callable[[str], None] | None = None,
    cap_cache: str | Path | None = None,
) -> int:
    """The draft cap maximizing predicted tok/s for this pair on this machine.

    Cached in the file `cap_cache` (default `cache_file()`) per target name, target precision,
    drafter (`drafter_tag`, default its kind and precision), chip, backend, BLAS and mlx
    version. A cached cap is returned at once unless `survival` (observed P(at least k drafts
    accepted), k = 1..) or `refresh` is given. Otherwise the cost curves (cached
    ones reused unless `refresh`) are combined with `survival`, else the survival `bench` last
    observed for this key, else a prior of 0.7 per position.

    Measuring (only on a cache miss or with `refresh`) times the target at K = 1..max_draft+1
    tokens and the drafter at every cap on a `context_len`-token context, repeats bounded by
    `budget_s` (see `measure_costs`); `notify` gets a line before and after it.
    """
    path = Path(cap_cache).expanduser() if cap_cache else cache_file()
    key = cap_cache_key(target, drafter, drafter_tag)
    entry = _read_cache(path).get(key, {})
    cached = entry.get("cap")
    usable = isinstance(cached, int) and 1 <= cached <= drafter.max_draft
    if survival is None and not refresh and usable:
        return cached
    costs = None if refresh else CostModel.from_json(entry.get("costs"))
    if costs is None or max(costs.caps(), default=0) < drafter.max_draft:
        if notify:
            notify(
                f"mlx-specdec: calibrating the draft cap for this model on this machine (once, "
                f"a few seconds; cached in {path}); --max-draft N skips it"
            )
        t0 = time.perf_counter()
        costs = measure_costs(target, drafter, context_len, max_width=1, budget_s=budget_s)
        if notify:
            notify(f"mlx-specdec: calibrated in {time.perf_counter() - t0:.1f} s")
    surv = list(survival or entry.get("survival") or geometric_survival(PRIOR_ACCEPT, 1))
    cap = costs.best_cap(surv)
    store_auto_cap(path, key, costs, surv, cap)
    return cap


def resolve_max_draft(
    target: Target,
    drafter: Drafter | None,
    max_draft: int | str | None,
    *,
    notify: Callable[[str], None] | None = None,
    cap_cache: str | Path | None = None,
) -> int | None:
    """What a `max_draft` setting means for this pair: "auto" -> `auto_max_draft` (the cap
    cached in `cap_cache`, or one calibrated now and cached there); None -> None (the drafter's
    full block); N -> N (checked later against the drafter's block). Plain decoding (no drafter)
    needs no cap."""
    if isinstance(max_draft, str):
        if max_draft != "auto":
            raise SpecDecError(f"max_draft must be an integer, None or 'auto', got '{max_draft}'")
        if drafter is None:
            return None
        return auto_max_draft(target, drafter, notify=notify, cap_cache=cap_cache)
    return max_draft


# ================================================================================ batch sizes
def measure_batch_costs(
    target: Target,
    drafter: Drafter,
    rows: int,
    context_len: int,
    *,
    context_rows: int = 3,
    reps: int = 3,
    budget_s: float | None = None,
) -> CostModel:
    """`measure_costs` for a batched round of `rows` sequences (`batch.BatchDecoder`): one
    verify forward of `rows` x K tokens, K = 1..max_draft+1, and one drafter call for all rows
    per cap. Times are per round: the model's tok/s, times `rows`, is the batch's."""
    from .drafters.batched import batched, propose_each, propose_rows
    from .rows import RowRNG, batch_kv, forward_rows, make_row_cache, prepare

    prepare(target)
    widths = range(1, drafter.max_draft + 2)
    share = budget_s / (len(widths) + drafter.max_draft) if budget_s is not None else None
    ids = mx.random.randint(0, target.vocab_size, (context_len,), key=mx.random.key(0))
    first = make_row_cache(target)
    _, taps = target.prefill(ids.astype(mx.int32), first)
    kv = batch_kv([first] * rows, len(first))  # rows of the same context
    mx.eval([layer.state for layer in kv])

    def verify(k: int) -> Callable[[], Any]:
        tokens = mx.broadcast_to(ids[:k].astype(mx.int32), (rows, k))

        def run() -> list[mx.array]:
            out = list(forward_rows(target, tokens, kv))
            mx.eval(out)
            for layer in kv:
                for row in range(rows):
                    layer.trim(row, k)
            return out

        return run

    verify_ms = {k: _median_ms(verify(k), reps, share) for k in widths}
    n = max(1, min(context_rows, drafter.max_draft + 1))
    states = [drafter.new_state(False) for _ in range(rows)]
    greedy, rngs = [SamplingParams()] * rows, [RowRNG(0) for _ in range(rows)]
    context, nexts = [taps[:n]] * rows, [ids[:n].astype(mx.int32)] * rows

    def propose(cap: int) -> Callable[[], Any]:
        def run() -> mx.array:
            if batched(drafter):
                anchors = mx.stack([t[-1] for t in nexts])
                tokens, _ = propose_rows(
                    drafter, states, context, anchors, [cap] * rows, greedy, rngs
                )
            else:
                tokens, _, _ = propose_each(
                    drafter, states, context, nexts, [cap] * rows, greedy, rngs
                )
            mx.eval(tokens)
            for s in states:
                _rewind(s, n)
            return tokens

        return run

    mx.eval(propose(1)())
    draft_ms = {c: _median_ms(propose(c), reps, share) for c in range(1, drafter.max_draft + 1)}
    return CostModel(context_len, verify_ms, draft_ms)


def cap_or_plain(costs: CostModel, survival: Sequence[float]) -> int:
    """The fastest cap by the model, or 0 when plain decoding (one token a round) is faster."""
    cap = costs.best_cap(survival)
    spec = costs.predicted_tps(cap, expected_accept(survival, cap))
    return cap if spec > costs.baseline_tps else 0


def batch_caps(
    target: Target,
    drafter: Drafter,
    sizes: Sequence[int],
    *,
    context_len: int = AUTO_CONTEXT // 2,
    budget_s: float = AUTO_BUDGET_S,
    cap_cache: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
) -> dict[int, int]:
    """Per batch size, the cap the cost model picks (0: plain batched decoding is faster).

    A verify of B rows costs little more than one row's where decoding is bound by memory
    traffic, so speculation keeps paying as B grows; where it is bound by compute (small models
    on CPUs) its cost grows with B and the cap falls, down to 0. Cached like `auto_max_draft`'s
    cap (one entry per size, `cap_cache`), from the survival `bench` last observed (else the
    prior); sizes not cached are measured now, `budget_s` in all."""
    path = Path(cap_cache).expanduser() if cap_cache else cache_file()
    key = cap_cache_key(target, drafter)
    entries = _read_cache(path)
    surv = list(entries.get(key, {}).get("survival") or geometric_survival(PRIOR_ACCEPT, 1))
    caps = {}
    missing = [
        b for b in sizes if not isinstance(entries.get(f"{key}|batch{b}", {}).get("cap"), int)
    ]
    if missing and notify:
        notify(f"mlx-specdec: timing batched rounds of {missing} rows (once; cached in {path})")
    for b in sizes:
        entry = entries.get(f"{key}|batch{b}", {})
        if b in missing:
            costs = measure_batch_costs(
                target, drafter, b, context_len, budget_s=budget_s / len(missing)
            )
            entry = {"cap": cap_or_plain(costs, surv), "costs": costs.to_json()}
            store = _read_cache(path)
            store[f"{key}|batch{b}"] = entry
            _write_cache(path, store)
        caps[b] = min(entry["cap"], drafter.max_draft)
    # A wider batch never pays more for speculation than a narrower one: timing noise aside,
    # a larger batch's cap is at most a smaller one's.
    for small, large in zip(sorted(caps), sorted(caps)[1:]):
        caps[large] = min(caps[large], caps[small])
    return caps


def cap_for_batch(caps: dict[int, int]) -> Callable[[int], int]:
    """`BatchDecoder`'s `cap_for`: the cap chosen for the largest measured size <= B."""
    sizes = sorted(caps)

    def cap_for(b: int) -> int:
        return caps[max((s for s in sizes if s <= b), default=sizes[0])]

    return cap_for
