"""`mlx-specdec bench`: modes head to head, a measured cost model, and the auto draft cap.

Three parts:
- the benchmark proper: every mode on the same target and prompts (warm-up excluded, medians
  over trials), against mlx-lm's own generation, with a token-by-token lossless verdict;
- the cost model: target forward time for K = 1..16 tokens and drafter time per round, measured
  at the run's context length; predicted tok/s per cap = A(cap) / (t_draft(cap) + t_verify(cap+1));
  `auto_max_draft` picks the cap from it and caches the choice per model, precision and machine;
- a synthetic-acceptance mode: random-weight targets and drafters of real shapes whose round
  acceptance follows a given profile, to measure the loop's cost at scale without the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .bench_prompts import BUILTIN
from .drafters.base import Drafter
from .errors import SpecDecError
from .generate import GenerationResult, _baseline_steps, _stream, encode_prompt
from .sampling import SamplingParams
from .speculate import Round, speculate
from .target import Target

HELP = "benchmark modes head to head: speed-up, acceptance, cost model, lossless verdict"

SPEC_MODES = ("dspark", "dflash", "eagle3")
ALL_MODES = ("baseline", "draft-model", *SPEC_MODES)
MLX_LM_DEFAULT_DRAFTS = 3  # mlx_lm.generate --num-draft-tokens default
PRIOR_ACCEPT = 0.7  # per-position acceptance assumed before any run was observed
CACHE_VERSION = 1
AUTO_CONTEXT = 512  # context length (tokens) auto_max_draft times the components at
AUTO_BUDGET_S = 6.0  # seconds of timed repeats auto_max_draft may spend (see measure_costs)

# Mean accepted length per round (bonus included, block 7, non-thinking), DSpark paper Table 1,
# averaged per domain: chat = MT-Bench/Alpaca/Arena-Hard, code = MBPP/HumanEval/LCB,
# math = GSM8K/MATH/AIME25.
PAPER_ACCEPTANCE: dict[str, dict[str, float]] = {
    "qwen3-4b": {"chat": 3.49, "code": 5.12, "math": 5.57},
    "qwen3-8b": {"chat": 3.50, "code": 5.28, "math": 5.65},
}


# ================================================================================ prompts
@dataclass(frozen=True)
class BenchPrompt:
    text: str
    domain: str


def read_jsonl(path: Path) -> list[BenchPrompt]:
    """`{"prompt": str, "domain": str}` per line (domain defaults to "custom"); blanks skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SpecDecError(f"cannot read prompt file '{path}': {e.strerror or e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SpecDecError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SpecDecError(f'{path}:{n}: each line must be an object with a "prompt" string')
        domain = row.get("domain", "custom")
        if not isinstance(domain, str) or not domain:
            raise SpecDecError(f'{path}:{n}: "domain" must be a non-empty string')
        if not row["prompt"].strip():
            raise SpecDecError(f"{path}:{n}: the prompt is empty")
        prompts.append(BenchPrompt(row["prompt"], domain))
    if not prompts:
        raise SpecDecError(f"prompt file '{path}' holds no prompts")
    return prompts


def load_prompts(spec: str, limit: int | None = None) -> list[BenchPrompt]:
    """`chat,code,math` (any of the built-in sets) or a JSONL file; `limit` prompts per domain."""
    path = Path(spec).expanduser()
    if spec.endswith(".jsonl") or path.is_file():
        prompts = read_jsonl(path)
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [s for s in names if s not in BUILTIN]
        if unknown or not names:
            raise SpecDecError(
                f"--prompts: unknown set '{','.join(unknown) or spec}'; use any of "
                f"{', '.join(BUILTIN)} or a .jsonl file"
            )
        prompts = [BenchPrompt(t, name) for name in names for t in BUILTIN[name]]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            seen[p.domain] = seen.get(p.domain, 0) + 1
            if seen[p.domain] <= limit:
                kept.append(p)
        prompts = kept
    return prompts


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


def machine_line(m: dict[str, str]) -> str:
    return (
        f"machine: {m['chip']} | CPU {m['cpu']} | MLX backend {m['backend']} | BLAS {m['blas']} "
        f"| mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, Python {m['python']}"
    )


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


def rate_for_accept_len(tau: float, block: int) -> float:
    """Per-position acceptance p with 1 + p + ... + p^block = tau (a flat, DSpark-like profile)."""
    if not 1.0 <= tau <= block + 1:
        raise SpecDecError(f"accept length {tau} is outside 1..{block + 1} for a block of {block}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 + sum(mid**k for k in range(1, block + 1)) < tau else (lo, mid)
    return (lo + hi) / 2


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
        Target.rollback(cache, 1)
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
        state = drafter.new_state()
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


# ================================================================================ auto cap
def cache_file() -> Path:
    root = os.environ.get("MLX_SPECDEC_CACHE") or "~/.cache/mlx-specdec"
    return Path(root).expanduser() / "max_draft.json"


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
    whose weights were replaced (a retrained drafter, a new demo) is measured afresh."""
    from .prefix_cache import fingerprint

    m = machine_info()
    return "|".join(
        [
            _target_id(target),
            _precision(target),
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


def store_auto_cap(key: str, costs: CostModel, survival: Sequence[float], cap: int) -> None:
    path = cache_file()
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
) -> int:
    """The draft cap maximizing predicted tok/s for this pair on this machine.

    Cached in ~/.cache/mlx-specdec/max_draft.json (or $MLX_SPECDEC_CACHE) per target name,
    target precision, drafter (`drafter_tag`, default its kind and precision), chip, backend,
    BLAS and mlx version. A cached cap is returned at once unless `survival` (observed P(at
    least k drafts accepted), k = 1..) or `refresh` is given. Otherwise the cost curves (cached
    ones reused unless `refresh`) are combined with `survival`, else the survival `bench` last
    observed for this key, else a prior of 0.7 per position.

    Measuring (only on a cache miss or with `refresh`) times the target at K = 1..max_draft+1
    tokens and the drafter at every cap on a `context_len`-token context, repeats bounded by
    `budget_s` (see `measure_costs`); `notify` gets a line before and after it.
    """
    key = cap_cache_key(target, drafter, drafter_tag)
    entry = _read_cache(cache_file()).get(key, {})
    cached = entry.get("cap")
    usable = isinstance(cached, int) and 1 <= cached <= drafter.max_draft
    if survival is None and not refresh and usable:
        return cached
    costs = None if refresh else CostModel.from_json(entry.get("costs"))
    if costs is None or max(costs.caps(), default=0) < drafter.max_draft:
        if notify:
            notify(
                f"mlx-specdec: calibrating the draft cap for this model on this machine (once, "
                f"a few seconds; cached in {cache_file()}); --max-draft N skips it"
            )
        t0 = time.perf_counter()
        costs = measure_costs(target, drafter, context_len, max_width=1, budget_s=budget_s)
        if notify:
            notify(f"mlx-specdec: calibrated in {time.perf_counter() - t0:.1f} s")
    surv = list(survival or entry.get("survival") or geometric_survival(PRIOR_ACCEPT, 1))
    cap = costs.best_cap(surv)
    store_auto_cap(key, costs, surv, cap)
    return cap


def resolve_max_draft(
    target: Target,
    drafter: Drafter | None,
    max_draft: int | str | None,
    *,
    notify: Callable[[str], None] | None = None,
) -> int | None:
    """What a `max_draft` setting means for this pair: "auto" -> `auto_max_draft` (the cached
    cap, or one calibrated now and cached); None -> None (the drafter's full block); N -> N
    (checked later against the drafter's block). Plain decoding (no drafter) needs no cap."""
    if isinstance(max_draft, str):
        if max_draft != "auto":
            raise SpecDecError(f"max_draft must be an integer, None or 'auto', got '{max_draft}'")
        if drafter is None:
            return None
        return auto_max_draft(target, drafter, notify=notify)
    return max_draft


# ================================================================================ running
@dataclass
class Row:
    """One configuration raced: a mode at a cap (None = the mode has no cap)."""

    mode: str
    cap: int | None = None
    drafter: Drafter | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or (self.mode if self.cap is None else f"{self.mode}@{self.cap}")


class _NullTokenizer:
    """Enough of a tokenizer for `_stream` when the ids mean nothing (synthetic mode)."""

    eos_token_ids: list[int] = []

    class _Detok:
        text = ""
        last_segment = ""

        def reset(self) -> None: ...
        def add_token(self, t: int) -> None: ...
        def finalize(self) -> None: ...

    detokenizer = _Detok()


def _draft_model_steps(
    target: Target,
    draft_lm: Any,
    ids: list[int],
    max_new: int,
    drafts: int,
    params: SamplingParams,
    eos: set[int],
) -> Iterator[tuple[list[int], Round | None]]:
    """mlx-lm's own `--draft-model` speculation, regrouped into rounds for the same statistics.
    A round ends at each token the target itself produced (`from_draft` False)."""
    from mlx_lm.generate import speculative_generate_step
    from mlx_lm.sample_utils import make_sampler

    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(params.temperature, params.top_p, params.min_p, top_k=params.top_k)
    gen = speculative_generate_step(
        mx.array(ids),
        target.model,
        draft_lm,
        num_draft_tokens=drafts,
        max_tokens=max_new,
        sampler=sampler,
    )
    buf: list[int] = []
    first = True
    for token, _, from_draft in gen:
        token = int(token)
        if first:  # the first token is reported alone (time to first token), as in the others
            first = False
            yield [token], None
        else:
            buf.append(token)
            if not from_draft or token in eos:
                yield buf, Round(buf[:-1], len(buf) - 1, buf)
                buf = []
        if token in eos:
            break
    if buf:
        yield buf, Round(buf, len(buf), buf)


def run_row(
    row: Row,
    target: Target,
    tokenizer: Any,
    ids: list[int],
    max_new: int,
    params: SamplingParams,
    draft_lm: Any = None,
) -> GenerationResult:
    eos = set(tokenizer.eos_token_ids)
    if row.mode == "baseline":
        steps = _baseline_steps(target, ids, max_new, params, eos)
    elif row.mode == "draft-model":
        steps = _draft_model_steps(target, draft_lm, ids, max_new, row.cap or 1, params, eos)
    else:
        assert row.drafter is not None
        target.set_taps(row.drafter.tap_ids)
        spec = speculate(
            target,
            row.drafter,
            ids,
            max_new_tokens=max_new,
            max_draft=row.cap,
            params=params,
            eos_ids=eos,
        )
        steps = ((s.tokens, s.round) for s in spec)
    *_, last = _stream(tokenizer, steps, len(ids), max_new, row.name, {})
    assert last.result is not None
    return last.result


@dataclass
class Sample:
    """One generation's measurements."""

    row: str
    domain: str
    prompt: int
    trial: int
    tokens: list[int]
    rounds: int
    committed: int
    accepted: list[int]
    proposed: int
    prefill_s: float
    decode_s: float

    @classmethod
    def of(cls, row: str, domain: str, prompt: int, trial: int, r: GenerationResult) -> Sample:
        return cls(
            row,
            domain,
            prompt,
            trial,
            r.tokens,
            len(r.rounds),
            sum(len(x.committed) for x in r.rounds),
            [x.accepted for x in r.rounds],
            max((len(x.proposed) for x in r.rounds), default=0),
            r.prefill_seconds,
            r.decode_seconds,
        )


def summarize(samples: Sequence[Sample], row: str, domain: str) -> dict[str, Any] | None:
    """Per trial, pool the domain's prompts (tokens over seconds); then the median over trials."""
    mine = [s for s in samples if s.row == row and (domain == "all" or s.domain == domain)]
    if not mine:
        return None
    per_trial = []
    for t in sorted({s.trial for s in mine}):
        ss = [s for s in mine if s.trial == t]
        decode_s = sum(s.decode_s for s in ss)
        total_s = decode_s + sum(s.prefill_s for s in ss)
        per_trial.append(
            dict(
                accept_len=sum(s.committed for s in ss) / max(1, sum(s.rounds for s in ss)),
                decode_tps=sum(s.committed for s in ss) / decode_s if decode_s else 0.0,
                e2e_tps=sum(len(s.tokens) for s in ss) / total_s if total_s else 0.0,
                ttft_ms=1000 * statistics.mean(s.prefill_s for s in ss),
                tokens=sum(len(s.tokens) for s in ss),
            )
        )
    out = {k: statistics.median(t[k] for t in per_trial) for k in per_trial[0]}
    out["trials"] = per_trial
    return out


def lossless_verdict(samples: Sequence[Sample], reference: str, greedy: bool) -> dict[str, Any]:
    """Greedy outputs must equal the reference row's, token by token, for every prompt/trial."""
    if not greedy:
        return {
            "checked": False,
            "lossless": None,
            "note": "skipped: at temperature > 0 outputs are samples, so the token-by-token "
            "verdict is for greedy (temperature 0); the sampler's exactness is "
            "tested statistically in tests/test_sampling.py",
        }
    ref = {s.prompt: s.tokens for s in samples if s.row == reference and s.trial == 0}
    mismatches = []
    checked = 0
    for s in samples:
        if s.row == reference and s.trial == 0 or s.prompt not in ref:
            continue
        checked += 1
        a, b = ref[s.prompt], s.tokens
        if a != b:
            pairs = enumerate(zip(a, b, strict=False))
            where = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
            mismatches.append(
                {"row": s.row, "prompt": s.prompt, "trial": s.trial, "first_difference": where}
            )
    return {
        "checked": True,
        "reference": reference,
        "compared": checked,
        "lossless": not mismatches,
        "mismatches": mismatches,
    }


# ================================================================================ printing
def _fmt_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (so printed output pastes into docs as is)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(results: list[dict[str, Any]]) -> str:
    header = [
        "mode",
        "cap",
        "domain",
        "accept",
        "decode tok/s",
        "e2e tok/s",
        "TTFT ms",
        "speed-up",
        "e2e speed-up",
    ]
    rows = [
        [
            r["row"],
            r["cap"],
            r["domain"],
            r["accept_len"],
            r["decode_tps"],
            r["e2e_tps"],
            r["ttft_ms"],
            r.get("speedup"),
            r.get("e2e_speedup"),
        ]
        for r in results
    ]
    return _fmt_table(header, rows)


def cost_tables(costs: CostModel, survival: Sequence[float], label: str) -> str:
    ks = sorted(costs.verify_ms)
    curve = _fmt_table(
        ["K"] + [str(k) for k in ks], [["verify ms"] + [costs.verify_ms[k] for k in ks]]
    )
    body = [
        [
            r["cap"],
            r["draft_ms"],
            r["verify_ms"],
            r["draft_ms"] + r["verify_ms"],
            r["accept_len"],
            r["tok_s"],
            r["speedup"],
        ]
        for r in costs.table(survival)
    ]
    caps = _fmt_table(
        [
            "cap",
            "draft ms",
            "verify ms (cap+1)",
            "round ms",
            "E[accept]",
            "pred tok/s",
            "pred speed-up",
        ],
        body,
    )
    best = costs.best_cap(survival) if costs.draft_ms else None
    return (
        f"cost model {label} (context {costs.context_len} tokens; plain decode step "
        f"{costs.verify_ms[1]:.2f} ms = {costs.baseline_tps:.1f} tok/s)\n{curve}\n\n{caps}\n"
        + (f"best cap: {best}\n" if best else "")
    )


def efficiency_rows(rows_stats: list[dict[str, Any]], costs: dict[str, CostModel]) -> str:
    body = []
    for r in rows_stats:
        cm = costs.get(r["mode"])
        if cm is None or r["cap"] is None or r["cap"] not in cm.draft_ms:
            continue
        pred = cm.predicted_tps(r["cap"], r["accept_len"])
        r["predicted_tps"], r["efficiency"] = pred, r["decode_tps"] / pred
        body.append(
            [r["row"], r["domain"], r["accept_len"], r["decode_tps"], pred, r["efficiency"]]
        )
    if not body:
        return ""
    return (
        "loop efficiency = measured decode tok/s / predicted from the measured component "
        "times at the measured accept length (aim >= 0.95)\n"
        + _fmt_table(
            ["row", "domain", "accept", "measured tok/s", "predicted tok/s", "efficiency"], body
        )
        + "\n"
    )


def plot(path: str, stats: list[dict[str, Any]], costs: dict[str, CostModel], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecDecError("--plot needs matplotlib: pip install 'mlx-specdec[bench]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in dict.fromkeys(s["row"] for s in stats if s.get("speedup") is not None)]
    domains = list(dict.fromkeys(s["domain"] for s in stats))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        ys = [
            next((s["speedup"] for s in stats if s["row"] == row and s["domain"] == d), 0)
            for d in domains
        ]
        ax1.bar([j + i * width for j in range(len(domains))], ys, width, label=row)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(domains))], domains)
    ax1.set_ylabel("decode speed-up over mlx-lm")
    ax1.legend(fontsize=8)
    for name, cm in costs.items():
        ks = sorted(cm.verify_ms)
        ax2.plot(ks, [cm.verify_ms[k] for k in ks], marker="o", label=f"verify ({name})")
        if cm.draft_ms:
            cs = sorted(cm.draft_ms)
            ax2.plot(
                [c + 1 for c in cs],
                [cm.draft_ms[c] for c in cs],
                marker="x",
                ls="--",
                label=f"{name} drafter round (cap = K-1)",
            )
    ax2.set_xlabel("tokens per target forward K")
    ax2.set_ylabel("ms")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise SpecDecError(f"cannot write the plot '{path}': {e.strerror or e}") from None
    plt.close(fig)


def _write_json(path: str, report: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(report, indent=1, default=str) + "\n")
    except OSError as e:
        raise SpecDecError(f"cannot write the JSON report '{path}': {e.strerror or e}") from None


def _command() -> str:
    args = sys.argv[1:]
    return "mlx-specdec bench " + " ".join(args[1:] if args[:1] == ["bench"] else args)


# ================================================================================ arguments
def parse_caps(text: str) -> list[int | str]:
    caps: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "auto":
            caps.append("auto")
            continue
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value < 1:
            raise SpecDecError(f"--max-draft takes positive integers or 'auto', got '{part}'")
        caps.append(value)
    return list(dict.fromkeys(caps))


def parse_drafters(items: Sequence[str] | None) -> dict[str | None, str]:
    """`--drafter PATH` (for the one speculative mode) or `--drafter MODE=PATH`, repeatable."""
    out: dict[str | None, str] = {}
    for item in items or []:
        mode, sep, path = item.partition("=")
        if sep and mode in SPEC_MODES:
            out[mode] = path
        else:
            out[None] = item
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="target: Hugging Face repo id or local folder")
    p.add_argument(
        "--modes",
        help="comma list of " + ", ".join(ALL_MODES) + " (default: "
        "baseline, draft-model if --draft-model, every mode with a known drafter)",
    )
    p.add_argument(
        "--drafter",
        action="append",
        metavar="[MODE=]PATH",
        help="drafter for a speculative mode (default: from the registry); repeatable",
    )
    p.add_argument("--drafter-bits", type=int, default=4, choices=[4, 8, 16, 32])
    p.add_argument(
        "--draft-model",
        metavar="SMALL_LM",
        help="a small LM for mlx-lm's own --draft-model speculation (mode draft-model)",
    )
    p.add_argument(
        "--prompts",
        default="chat,code,math",
        help='built-in sets (chat, code, math) or a JSONL file of {"prompt": ..., "domain": ...}',
    )
    p.add_argument("--limit", type=int, help="use at most this many prompts per domain")
    p.add_argument("--trials", type=int, default=3, help="timed runs per prompt (median)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--max-draft",
        default="auto",
        help="caps to race, e.g. 2,4,7,auto (auto: from the cost model; mlx-lm's "
        "draft-model uses its default 3 for auto)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (lossless verdict checked); > 0 samples every mode, "
        "mlx-lm's included, and skips the verdict",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-thinking", action="store_true", help="chat template without thinking")
    p.add_argument("--cost-reps", type=int, default=5, help="timed repeats per cost-model point")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="speed-ups and cost curves (matplotlib)")
    s = p.add_argument_group("synthetic acceptance (random weights, real shapes)")
    s.add_argument(
        "--synthetic",
        choices=sorted(SHAPES),
        metavar="SHAPE",
        help=f"instead of --model: one of {', '.join(sorted(SHAPES))}",
    )
    s.add_argument(
        "--acceptance",
        help="mean accept lengths at block 7 to impose, e.g. "
        "chat=3.49,code=5.12 (default: the DSpark paper's domain means)",
    )
    s.add_argument(
        "--target-bits",
        type=int,
        default=8,
        choices=[4, 8, 16, 32],
        help="synthetic target precision (16 = bf16, 32 = float32)",
    )
    s.add_argument("--context", type=int, default=512, help="synthetic prompt length in tokens")


def _check_args(args: argparse.Namespace) -> None:
    if args.trials < 1:
        raise SpecDecError(f"--trials must be >= 1, got {args.trials}")
    if args.max_new_tokens < 2:
        raise SpecDecError(f"--max-new-tokens must be >= 2, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise SpecDecError(f"--limit must be >= 1, got {args.limit}")
    if args.cost_reps < 1:
        raise SpecDecError(f"--cost-reps must be >= 1, got {args.cost_reps}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.synthetic:
        if args.temperature != 0:
            raise SpecDecError(
                "--synthetic imposes acceptance through greedy verification; "
                "--temperature applies to real models only"
            )
        return run_synthetic(args)
    if not args.model:
        raise SpecDecError("no model given: pass --model REPO_OR_PATH (or --synthetic SHAPE)")
    return run_bench(args)


# ================================================================================ bench
def _resolve_modes(args: argparse.Namespace, drafters: dict[str | None, str]) -> list[str]:
    from . import registry

    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in ALL_MODES]
        if bad or not modes:
            raise SpecDecError(
                f"--modes: unknown mode '{','.join(bad) or args.modes}'; use {', '.join(ALL_MODES)}"
            )
        if "draft-model" in modes and not args.draft_model:
            raise SpecDecError("mode draft-model needs --draft-model SMALL_LM")
        return modes
    modes = ["baseline"] + (["draft-model"] if args.draft_model else [])
    entry = registry.lookup(args.model)
    for m in SPEC_MODES:
        if m in drafters or (entry is not None and entry.drafter(m)):
            modes.append(m)
    if None in drafters and not any(m in SPEC_MODES for m in modes):
        modes.append("dspark")
    return modes


def _load_drafters(
    args: argparse.Namespace, modes: list[str], target: Target, drafters: dict[str | None, str]
) -> dict[str, Drafter]:
    from . import registry
    from .loading import load_drafter

    spec = [m for m in modes if m in SPEC_MODES]
    if drafters.get(None) and len(spec) > 1:
        raise SpecDecError(
            "several speculative modes: give each its drafter as --drafter MODE=PATH"
        )
    loaded = {}
    for m in spec:
        ref = drafters.get(m) or drafters.get(None) or registry.resolve_mode(args.model, m, None)[1]
        if ref is None:
            raise SpecDecError(
                f"no {m} drafter is known for '{args.model}'; pass --drafter {m}=PATH"
            )
        loaded[m], _, _ = load_drafter(ref, target, bits=args.drafter_bits, mode=m)
    return loaded


def run_bench(args: argparse.Namespace) -> int:
    from .loading import load_target

    machine = machine_info()
    print(machine_line(machine), flush=True)
    drafter_refs = parse_drafters(args.drafter)
    modes = _resolve_modes(args, drafter_refs)
    caps = parse_caps(args.max_draft)
    prompts = load_prompts(args.prompts, args.limit)
    params = SamplingParams(args.temperature, seed=args.seed)

    target, tokenizer = load_target(args.model)
    drafters = _load_drafters(args, modes, target, drafter_refs)
    draft_lm = None
    if "draft-model" in modes:
        small, _ = load_target(args.draft_model, name=args.draft_model)
        if small.vocab_size != target.vocab_size:
            raise SpecDecError(
                f"--draft-model has {small.vocab_size} logits per token but the "
                f"target has {target.vocab_size}: they must share a vocabulary"
            )
        draft_lm = small.model
    ids = [
        encode_prompt(
            tokenizer,
            p.text,
            chat=not args.no_chat,
            enable_thinking=False if args.no_thinking else None,
        )
        for p in prompts
    ]
    context_len = int(statistics.median(len(x) for x in ids)) + args.max_new_tokens // 2

    rows: list[Row] = []
    for m in modes:
        if m == "baseline":
            rows.append(Row("baseline"))
        elif m == "draft-model":
            for c in dict.fromkeys(MLX_LM_DEFAULT_DRAFTS if c == "auto" else c for c in caps):
                rows.append(Row(m, int(c)))
        else:
            d = drafters[m]
            fixed = [c for c in caps if c != "auto"]
            for c in fixed:
                if c > d.max_draft:
                    raise SpecDecError(
                        f"--max-draft {c} exceeds the {m} drafter's block ({d.max_draft})"
                    )
            # 'auto' needs the acceptance at the full block first (it gives P(>= k) for all k).
            if "auto" in caps and d.max_draft not in fixed:
                fixed.append(d.max_draft)
            rows += [Row(m, int(c), d) for c in fixed]

    print(
        f"target {args.model} | modes {', '.join(modes)} | {len(prompts)} prompts | "
        f"{args.trials} trials | {args.max_new_tokens} new tokens | temperature "
        f"{args.temperature} | context for the cost model {context_len}",
        flush=True,
    )
    samples: list[Sample] = []

    def race(batch: list[Row]) -> None:
        for row in batch:  # warm-up, excluded: one full generation per row
            run_row(row, target, tokenizer, ids[0], args.max_new_tokens, params, draft_lm)
        for trial in range(args.trials):
            for i, (p, x) in enumerate(zip(prompts, ids, strict=True)):
                for row in batch:  # interleaved, so drift in machine speed hits every row alike
                    r = run_row(row, target, tokenizer, x, args.max_new_tokens, params, draft_lm)
                    samples.append(Sample.of(row.name, p.domain, i, trial, r))
            print(f"  trial {trial + 1}/{args.trials} done", file=sys.stderr, flush=True)

    race(rows)

    # Cost model per speculative mode, at the run's context length and observed acceptance.
    costs: dict[str, CostModel] = {}
    survival: dict[str, list[float]] = {}
    report_costs: dict[str, Any] = {}
    for m, d in drafters.items():
        # P(>= k accepted) from the rounds at the largest cap raced (full-length rounds only).
        cap_seen = max(r.cap for r in rows if r.mode == m and r.cap is not None)
        obs = [a for s in samples if s.row == Row(m, cap_seen).name for a in s.accepted]
        survival[m] = survival_from_rounds(obs, cap_seen)
        mean_a = 1 + sum(survival[m])
        target.set_taps(d.tap_ids)
        costs[m] = measure_costs(
            target, d, context_len, context_rows=round(mean_a), reps=args.cost_reps, params=params
        )
        best = costs[m].best_cap(survival[m])
        store_auto_cap(cap_cache_key(target, d), costs[m], survival[m], best)
        report_costs[m] = {
            **costs[m].to_json(),
            "survival": survival[m],
            "best_cap": best,
            "table": costs[m].table(survival[m]),
        }
        if "auto" in caps:
            extra = Row(m, best, d, label=f"{m}@auto={best}")
            if all(r.name != Row(m, best).name for r in rows):
                race([extra])
                rows.append(extra)
            else:  # the auto cap was already raced: report it under both names
                for s in [s for s in samples if s.row == Row(m, best).name]:
                    samples.append(Sample(**{**asdict(s), "row": extra.name}))
                rows.append(extra)

    domains = list(dict.fromkeys(p.domain for p in prompts)) + ["all"]
    stats = []
    base = "baseline" if "baseline" in modes else rows[0].name
    for row in rows:
        for dom in domains:
            st = summarize(samples, row.name, dom)
            if st is None:
                continue
            b = summarize(samples, base, dom)
            st.update(row=row.name, mode=row.mode, cap=row.cap, domain=dom)
            st["speedup"] = st["decode_tps"] / b["decode_tps"] if b and b["decode_tps"] else None
            st["e2e_speedup"] = st["e2e_tps"] / b["e2e_tps"] if b and b["e2e_tps"] else None
            stats.append(st)
    verdict = lossless_verdict(samples, base, params.greedy)

    print()
    print(results_table(stats))
    print(
        f"\nspeed-up: decode tok/s over {base} (mlx-lm's own generation on the same target); "
        "accept = tokens committed per target forward, bonus included; medians over "
        f"{args.trials} trials, warm-up excluded"
    )
    for m in costs:
        print()
        print(cost_tables(costs[m], survival[m], f"[{m}]"))
    eff = efficiency_rows([s for s in stats if s["domain"] == "all"], costs)
    if eff:
        print(eff)
    print(_verdict_line(verdict))
    print(machine_line(machine))

    report = {
        "kind": "bench",
        "command": _command(),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "context_len": context_len,
        "results": stats,
        "cost_model": report_costs,
        "lossless": verdict,
        "samples": [asdict(s) for s in samples],
    }
    if args.json:
        _write_json(args.json, report)
    if args.plot:
        plot(
            args.plot,
            [s for s in stats if s["domain"] != "all"],
            costs,
            f"{args.model} | {machine_line(machine)}",
        )
    return 0 if verdict["lossless"] is not False else 1


def _verdict_line(v: dict[str, Any]) -> str:
    if not v["checked"]:
        return f"lossless: verdict {v['note']}"
    if v["lossless"]:
        return (
            f"lossless: yes, {v['compared']} greedy outputs identical to {v['reference']} "
            "token by token"
        )
    first = v["mismatches"][0]
    return (
        f"lossless: NO, {len(v['mismatches'])} of {v['compared']} outputs differ from "
        f"{v['reference']} (first: {first['row']} on prompt {first['prompt']}, from token "
        f"{first['first_difference']})"
    )


# ================================================================================ synthetic
@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    taps: tuple[int, ...]
    mask_token: int


SHAPES: dict[str, Shape] = {
    # A small Qwen3 for CPUs (the shape of mlx-lm-notes A7, ~134M parameters).
    "small": Shape(1024, 8, 3072, 16, 8, 64, 32000, True, (1, 2, 4, 5, 6), 31999),
    "qwen3-4b": Shape(2560, 36, 9728, 32, 8, 128, 151936, True, (1, 9, 17, 25, 33), 151669),
    "qwen3-8b": Shape(4096, 36, 12288, 32, 8, 128, 151936, False, (1, 9, 17, 25, 33), 151669),
}
DSPARK_BLOCK, DSPARK_LAYERS, DSPARK_RANK = 7, 5, 256  # the released DSpark drafters


def synthetic_pair(name: str, target_bits: int, drafter_bits: int) -> tuple[Target, Drafter]:
    """Random-weight Qwen3 target and DSpark drafter of the released checkpoints' shapes."""
    from mlx_lm.models import qwen3

    from .drafters.dspark import DSparkConfig, DSparkDrafter
    from .drafters.layers import quantize_drafter

    s = SHAPES[name]
    mx.random.seed(0)
    config = dict(
        model_type="qwen3",
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        vocab_size=s.vocab,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        tie_word_embeddings=s.tied,
    )
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    # bf16 as released; but MLX's CPU bf16 kernels are ~10x slower than fp32, so a CPU run keeps
    # fp32 activations (and quantization scales) unless 16 bits are asked for.
    on_cpu = mx.default_device() == mx.cpu
    dtype = mx.bfloat16 if target_bits == 16 or not on_cpu else mx.float32
    model.set_dtype(dtype)
    if target_bits in (4, 8):
        nn.quantize(model, group_size=64, bits=target_bits)
        config["quantization"] = {"group_size": 64, "bits": target_bits}
    mx.eval(model.parameters())
    target = Target(model, config, name=f"synthetic-{name}")
    dcfg = {
        **config,
        "num_hidden_layers": DSPARK_LAYERS,
        "block_size": DSPARK_BLOCK,
        "mask_token_id": s.mask_token,
        "target_layer_ids": list(s.taps),
        "num_target_layers": s.layers,
        "markov_rank": DSPARK_RANK,
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "architectures": ["Qwen3DSparkModel"],
    }
    drafter = DSparkDrafter(DSparkConfig.from_dict(dcfg))
    drafter.set_dtype(dtype)
    # The released drafters' embedding and head equal the target's, so the loader shares them;
    # random copies never compare equal, so share them directly (same effect on cost).
    drafter.pop("embed_tokens")
    drafter.pop("lm_head")
    drafter._shared.update(embed_tokens=target.embed_tokens, lm_head=target.head)
    quantize_drafter(drafter, drafter_bits)
    mx.eval(drafter.parameters())
    target.set_taps(drafter.tap_ids)
    return target, drafter


class ScriptedAcceptance:
    """Stands in for the target in the unchanged verify loop: runs the real forward (full cost),
    then overrides the logits so greedy verification accepts exactly as many drafts as the
    profile draws (each position accepted with probability `p`, stop at the first rejection).
    Everything else (prefill, cache, rollback, taps) is the real target's."""

    def __init__(self, target: Target, p: float, seed: int = 0):
        self._target, self._p, self._rng = target, p, random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def __call__(self, ids: mx.array, cache: list[Any], *, last_only: bool = False):
        logits, taps = self._target(ids, cache, last_only=last_only)
        n = ids.shape[0] - 1
        if last_only or n < 1:
            return logits, taps
        a = 0
        while a < n and self._rng.random() < self._p:
            a += 1
        drafts = ids[1:].astype(mx.int32)
        vocab = logits.shape[-1]
        # Rows < a agree with the drafts; row a disagrees (a correction); later rows are unused.
        want = mx.concatenate([drafts[:a], (drafts[a:] + 1) % vocab, drafts[-1:]])
        hit = mx.arange(vocab)[None] == want[:, None]
        return mx.where(hit, mx.array(1e4, logits.dtype), logits), taps


def _run_synthetic_row(
    target: Any, drafter: Drafter | None, ids: list[int], max_new: int, cap: int | None
) -> GenerationResult:
    tok = _NullTokenizer()
    if drafter is None:
        steps = _baseline_steps(target, ids, max_new, SamplingParams(), set())
    else:
        spec = speculate(target, drafter, ids, max_new_tokens=max_new, max_draft=cap)
        steps = ((s.tokens, s.round) for s in spec)
    *_, last = _stream(tok, steps, len(ids), max_new, "synthetic", {})
    assert last.result is not None
    return last.result


def parse_acceptance(text: str | None, shape: str) -> dict[str, float]:
    if not text:
        return dict(PAPER_ACCEPTANCE.get(shape, PAPER_ACCEPTANCE["qwen3-4b"]))
    out = {}
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        label, sep, value = part.rpartition("=")
        try:
            out[label if sep else f"level{i + 1}"] = float(value)
        except ValueError:
            raise SpecDecError(f"--acceptance: '{part}' is not NAME=LENGTH or LENGTH") from None
    if not out:
        raise SpecDecError("--acceptance is empty")
    return out


def run_synthetic(args: argparse.Namespace) -> int:
    machine = machine_info()
    print(machine_line(machine), flush=True)
    levels = parse_acceptance(args.acceptance, args.synthetic)
    rates = {k: rate_for_accept_len(v, DSPARK_BLOCK) for k, v in levels.items()}
    caps = parse_caps(args.max_draft)
    if any(c != "auto" and c > DSPARK_BLOCK for c in caps):
        raise SpecDecError(f"--max-draft: the DSpark block is {DSPARK_BLOCK}")
    t0 = time.perf_counter()
    target, drafter = synthetic_pair(args.synthetic, args.target_bits, args.drafter_bits)
    print(
        f"SYNTHETIC ACCEPTANCE (random weights; acceptance imposed, not measured): "
        f"{args.synthetic}-shaped target at {args.target_bits} bits, DSpark-shaped drafter "
        f"({DSPARK_LAYERS} layers, block {DSPARK_BLOCK}, Markov rank {DSPARK_RANK}) at "
        f"{args.drafter_bits} bits; built in {time.perf_counter() - t0:.1f} s; context "
        f"{args.context}, {args.max_new_tokens} new tokens, {args.trials} trials",
        flush=True,
    )
    rng = random.Random(args.seed)
    ids = [rng.randrange(target.vocab_size) for _ in range(args.context)]
    context_len = args.context + args.max_new_tokens // 2
    mean_tau = statistics.mean(levels.values())
    costs = measure_costs(
        target, drafter, context_len, context_rows=round(mean_tau), reps=args.cost_reps
    )

    plan: list[tuple[str, int]] = []
    for label, p in rates.items():
        for c in caps:
            cap = costs.best_cap(geometric_survival(p, DSPARK_BLOCK)) if c == "auto" else int(c)
            if (label, cap) not in plan:
                plan.append((label, cap))
    auto_caps = {
        label: costs.best_cap(geometric_survival(p, DSPARK_BLOCK)) for label, p in rates.items()
    }

    samples: list[Sample] = []
    _run_synthetic_row(target, None, ids, args.max_new_tokens, None)  # warm-up, excluded
    # Warm-up, excluded: every row once with the very acceptance draws its trials replay, so every
    # (verify width, context length) shape is met before timing (MLX CUDA compiles per shape).
    for label, cap in plan:
        _run_synthetic_row(
            ScriptedAcceptance(target, rates[label], seed=args.seed),
            drafter,
            ids,
            args.max_new_tokens,
            cap,
        )
    for trial in range(args.trials):
        r = _run_synthetic_row(target, None, ids, args.max_new_tokens, None)
        samples.append(Sample.of("baseline", "all", 0, trial, r))
        for label, cap in plan:
            scripted = ScriptedAcceptance(target, rates[label], seed=args.seed)
            r = _run_synthetic_row(scripted, drafter, ids, args.max_new_tokens, cap)
            samples.append(Sample.of(f"dspark@{cap}", label, 0, trial, r))
        print(f"  trial {trial + 1}/{args.trials} done", file=sys.stderr, flush=True)

    base = summarize(samples, "baseline", "all")
    assert base is not None
    stats = []
    body = []
    for label, cap in plan:
        st = summarize(samples, f"dspark@{cap}", label)
        assert st is not None
        pred = costs.predicted_tps(cap, st["accept_len"])
        ceiling = costs.predicted_tps(
            cap, expected_accept(geometric_survival(rates[label], DSPARK_BLOCK), cap)
        )
        st.update(
            row=f"dspark@{cap}",
            mode="dspark",
            cap=cap,
            domain=label,
            target_tau=levels[label],
            speedup=st["decode_tps"] / base["decode_tps"],
            predicted_tps=pred,
            efficiency=st["decode_tps"] / pred,
            auto=cap == auto_caps[label],
        )
        stats.append(st)
        body.append(
            [
                label,
                levels[label],
                f"{cap}{' (auto)' if st['auto'] else ''}",
                st["accept_len"],
                st["decode_tps"],
                pred,
                st["efficiency"],
                st["speedup"],
                ceiling / costs.baseline_tps,
            ]
        )
    print()
    print(
        f"baseline (mlx-lm generate_step, same random target): {base['decode_tps']:.1f} tok/s "
        f"decode, TTFT {base['ttft_ms']:.0f} ms"
    )
    print(
        _fmt_table(
            [
                "profile",
                "tau@7",
                "cap",
                "accept",
                "decode tok/s",
                "predicted tok/s",
                "efficiency",
                "speed-up",
                "model speed-up",
            ],
            body,
        )
    )
    print(
        "\naccept = measured tokens per round; predicted = accept / (t_draft + t_verify(cap+1)) "
        "from the cost model below; efficiency = measured / predicted; model speed-up = the "
        "cost model's ceiling at the profile's expected accept length over its plain step"
    )
    print()
    surv = geometric_survival(statistics.mean(rates.values()), DSPARK_BLOCK)
    print(cost_tables(costs, surv, f"[synthetic {args.synthetic}, mean profile]"))
    print(machine_line(machine))
    report = {
        "kind": "synthetic-acceptance",
        "command": _command(),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "shape": asdict(SHAPES[args.synthetic]),
        "levels": levels,
        "rates": rates,
        "baseline": base,
        "results": stats,
        "cost_model": {**costs.to_json(), "auto_caps": auto_caps},
    }
    if args.json:
        _write_json(args.json, report)
    if args.plot:
        plot(
            args.plot,
            stats,
            {"dspark": costs},
            f"SYNTHETIC {args.synthetic} | {machine_line(machine)}",
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mlx_specdec.bench ...`: the same command without the other subcommands."""
    parser = argparse.ArgumentParser(prog="mlx-specdec bench", description=HELP)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except SpecDecError as e:
        print(f"mlx-specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
