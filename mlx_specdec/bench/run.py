"""`mlx-specdec bench` on real models: every mode on the same target and prompts (warm-up
excluded, medians over trials, rows interleaved), against mlx-lm's own generation (and its
`--draft-model` speculation), with a token-by-token lossless verdict; then the cost model per
speculative mode at the run's context and observed acceptance, which refines the cached auto cap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import registry
from ..autocap import (
    CostModel,
    cap_cache_key,
    machine_info,
    measure_costs,
    store_auto_cap,
    survival_from_rounds,
)
from ..cli import blas_line, target_switches
from ..demo import KINDS, demo_paths, draft_lm_path
from ..divergence import find_divergence
from ..drafters.base import Drafter
from ..drafters.lookup import LookupConfig, LookupDrafter
from ..errors import SpecDecError
from ..generate import GenerationResult, baseline_steps, encode_prompt, stream_steps
from ..loading import load_drafter, load_target
from ..sampling import SamplingParams
from ..speculate import Round, speculate
from ..target import Target
from .prompts import load_prompts
from .report import (
    command_line,
    cost_tables,
    efficiency_rows,
    machine_line,
    plot,
    results_table,
    verdict_line,
    write_json,
)

SPEC_MODES = ("dspark", "dflash", "eagle3")
# Lookup alone, and each drafter with lookup rounds (no cost model: they size their own rounds).
LOOKUP_MODES = ("lookup", *(f"{m}+lookup" for m in SPEC_MODES))
ALL_MODES = ("baseline", "draft-model", *SPEC_MODES, *LOOKUP_MODES)
MLX_LM_DEFAULT_DRAFTS = 3  # mlx_lm.generate --num-draft-tokens default


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
        steps = baseline_steps(target, ids, max_new, params, eos)
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
    *_, last = stream_steps(tokenizer, steps, len(ids), max_new, row.name, {})
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


def explain_mismatches(
    verdict: dict[str, Any], samples: Sequence[Sample], target: Target, ids: Sequence[list[int]]
) -> None:
    """Add to each mismatch of a greedy verdict where its output parts from the reference, and
    whether at a near-tie of the target's logits there (`divergence.find_divergence`); count
    the near-ties (`near_ties`)."""
    if not verdict.get("mismatches"):
        return
    outputs = {(s.row, s.prompt, s.trial): s.tokens for s in samples}
    reference = verdict["reference"]
    memo: dict[Any, Any] = {}
    for m in verdict["mismatches"]:
        ref = outputs[(reference, m["prompt"], 0)]
        other = outputs[(m["row"], m["prompt"], m["trial"])]
        d = find_divergence(target.model, ids[m["prompt"]], ref, other, memo=memo)
        m["divergence"] = None if d is None else d.to_json()
    verdict["near_ties"] = sum(
        bool(m["divergence"] and m["divergence"]["near_tie"]) for m in verdict["mismatches"]
    )


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


def _resolve_modes(args: argparse.Namespace, drafters: dict[str | None, str]) -> list[str]:
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
    wanted = dict.fromkeys(m.removesuffix("+lookup") for m in modes)  # X+lookup wraps X
    spec = [m for m in wanted if m in SPEC_MODES]
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
    for m in (m for m in modes if m in LOOKUP_MODES):
        base = m.removesuffix("+lookup")
        loaded[m] = LookupDrafter(target.vocab_size, loaded.get(base))
    return {m: d for m, d in loaded.items() if m in modes}


def lookup_switches(text: str | None) -> list[int]:
    """`--lookup-switch 2,4,8`: the match lengths from which a drafter's rounds use lookup."""
    try:
        return [int(x) for x in text.split(",")] if text else []
    except ValueError:
        raise SpecDecError(f"--lookup-switch takes lengths like 2,4,8, got '{text}'") from None


def with_switches(m: str, d: Drafter, switches: list[int]) -> list[tuple[str, Drafter]]:
    """(label suffix, drafter): a MODE+lookup drafter once per --lookup-switch value."""
    if not (m.endswith("+lookup") and switches):
        return [("", d)]
    return [
        (f" switch {s}", LookupDrafter(d.vocab_size, d.trained, LookupConfig(switch_at=s)))
        for s in switches
    ]


def demo_pair_args(args: argparse.Namespace) -> argparse.Namespace:
    """`args` without --model: the embedded demo pair, as `generate` runs it: its target, its
    drafters (unless --drafter names others) and its draft LM for mode draft-model (unless
    --draft-model names another)."""
    target, _ = demo_paths("baseline")  # a clear error when the demo is not installed
    drafters = args.drafter or [f"{kind}={demo_paths(kind)[1]}" for kind in KINDS]
    draft_model = args.draft_model or draft_lm_path()
    return argparse.Namespace(
        **vars(args) | {"model": target, "drafter": drafters, "draft_model": draft_model}
    )


def run_bench(args: argparse.Namespace, cap_cache: Path) -> int:
    """Race the modes of `args`, print and write the report; each speculative mode's cap
    measured best is stored in the cap cache file `cap_cache`. 0 unless outputs differ."""
    machine = machine_info()
    print(machine_line(machine), flush=True)
    drafter_refs = parse_drafters(args.drafter)
    modes = _resolve_modes(args, drafter_refs)
    caps = parse_caps(args.max_draft)
    prompts = load_prompts(args.prompts, args.limit)
    params = SamplingParams(args.temperature, seed=args.seed)

    target, tokenizer = load_target(args.model, **target_switches())
    if getattr(args, "exact", False):
        target.use_exact()
        print(target.exact.describe(), file=sys.stderr)
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
    if line := blas_line():  # after loading, so that an error stays one line
        print(line, file=sys.stderr)
    ids = [
        encode_prompt(
            tokenizer,
            p.prompt(chat=not args.no_chat),
            chat=not args.no_chat,
            enable_thinking=False if args.no_thinking else None,
        )
        for p in prompts
    ]
    context_len = int(statistics.median(len(x) for x in ids)) + args.max_new_tokens // 2

    switches = lookup_switches(getattr(args, "lookup_switch", None))
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
            if "auto" in caps and m in SPEC_MODES and d.max_draft not in fixed:
                fixed.append(d.max_draft)
            if m in LOOKUP_MODES and not fixed:  # auto: the drafter sizes its own rounds
                fixed.append(d.max_draft)
            for c in fixed:
                for suffix, v in with_switches(m, d, switches):
                    rows.append(Row(m, int(c), v, f"{m}@{c}{suffix}" if suffix else ""))

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
    for m, d in ((m, d) for m, d in drafters.items() if m in SPEC_MODES):
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
        store_auto_cap(cap_cache, cap_cache_key(target, d), costs[m], survival[m], best)
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
    explain_mismatches(verdict, samples, target, ids)

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
    print(verdict_line(verdict))
    print(machine_line(machine))

    report = {
        "kind": "bench",
        "command": command_line(),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "context_len": context_len,
        "results": stats,
        "cost_model": report_costs,
        "lossless": verdict,
        "samples": [asdict(s) for s in samples],
    }
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(
            args.plot,
            [s for s in stats if s["domain"] != "all"],
            costs,
            f"{args.model} | {machine_line(machine)}",
        )
    return 0 if verdict["lossless"] is not False else 1
