"""Greedy mean accept length and decode speed-up of the demo pair on its held-out prompts, and
what one round costs (draft + verify) against a plain step.

Every speculative output is checked against mlx-lm's plain greedy generation (the baseline whose
speed the speed-up divides by) token for token. On a Linux CPU run it with OpenBLAS preloaded
(the `mlx-specdec` commands do this by themselves; see the README):

    OPENBLAS_NUM_THREADS=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/demo_accept.py [--modes dspark,dflash] [--per-domain 10] \\
        [--max-new-tokens 128] [--max-draft 7] [--drafter-bits 32] [--demo DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from mlx_specdec.autocap import baseline_step_ms, measure_costs
from mlx_specdec.demo import DEMO_DIR
from mlx_specdec.generate import baseline_generate, speculative_generate
from mlx_specdec.loading import load_drafter, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="dspark,dflash")
    ap.add_argument("--per-domain", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-draft", type=int, help="drafts per round (default: the full block)")
    ap.add_argument("--drafter-bits", type=int, default=32)
    ap.add_argument("--demo", default=str(DEMO_DIR), help="demo folder (default: the shipped one)")
    ap.add_argument("--trials", type=int, default=1, help="timed runs per prompt (best kept)")
    args = ap.parse_args()
    demo = Path(args.demo)
    target, tok = load_target(str(demo / "target"))
    drafters = {}
    for mode in args.modes.split(","):
        drafters[mode], _, _ = load_drafter(str(demo / mode), target, bits=args.drafter_bits)
    target.set_taps(next(iter(drafters.values())).tap_ids)  # every demo drafter taps the same
    prompts = [json.loads(line) for line in (demo / "prompts.jsonl").read_text().splitlines()]
    by = defaultdict(list)
    for p in prompts:
        by[p["domain"]].append(p["prompt"])
    opts = dict(max_new_tokens=args.max_new_tokens)
    for drafter in drafters.values():  # warm up every shape once
        speculative_generate(target, tok, drafter, "def f(x):", max_draft=args.max_draft, **opts)
    baseline_generate(target, tok, "def f(x):", **opts)
    t0 = time.perf_counter()
    print(f"{'mode':7s}{'domain':7s}{'prompts':>8s}{'tokens':>8s}{'accept':>8s}{'speed-up':>10s}"
          f"{'tok/s':>8s}{'base tok/s':>11s}")  # fmt: skip
    for mode, drafter in drafters.items():
        for domain, items in by.items():
            rounds = committed = n_tok = 0
            spec_s = base_s = 0.0
            for prompt in items[: args.per_domain]:
                best_spec = best_base = float("inf")
                for _ in range(args.trials):
                    b = baseline_generate(target, tok, prompt, **opts)
                    r = speculative_generate(
                        target, tok, drafter, prompt, max_draft=args.max_draft, **opts
                    )
                    if r.tokens != b.tokens:
                        raise SystemExit(f"{mode}: output differs from mlx-lm on {prompt!r}")
                    best_spec = min(best_spec, r.decode_seconds)
                    best_base = min(best_base, b.decode_seconds)
                rounds += len(r.rounds)
                committed += sum(len(x.committed) for x in r.rounds)
                n_tok += len(r.tokens)
                spec_s += best_spec
                base_s += best_base
            decoded = committed  # tokens after the first: what both decode times cover
            print(
                f"{mode:7s}{domain:7s}{min(len(items), args.per_domain):8d}{n_tok:8d}"
                f"{committed / max(rounds, 1):8.2f}{base_s / max(spec_s, 1e-9):9.2f}x"
                f"{decoded / max(spec_s, 1e-9):8.1f}{decoded / max(base_s, 1e-9):11.1f}",
                flush=True,
            )
    print(f"({time.perf_counter() - t0:.0f} s; outputs identical to mlx-lm greedy)")
    # Where the time goes: one round is a draft plus a verify of cap + 1 tokens; mlx-lm's own
    # step is what the baseline pays per token (our target step differs by the CPU kernels).
    base_ms = baseline_step_ms(target, 100)
    for mode, drafter in drafters.items():
        costs = measure_costs(target, drafter, 100, max_width=8, reps=20)
        cap = args.max_draft or drafter.max_draft
        round_ms = costs.round_ms(cap)
        print(
            f"{mode} cost (ms, context 100): mlx-lm step {base_ms:.2f}, our target step "
            f"{costs.verify_ms[1]:.2f}; draft {costs.draft_ms[cap]:.2f} + verify of {cap + 1} "
            f"tokens {costs.verify_ms[cap + 1]:.2f} = round {round_ms:.2f} "
            f"({round_ms / base_ms:.2f} mlx-lm steps, {round_ms / costs.verify_ms[1]:.2f} of ours)"
        )


if __name__ == "__main__":
    main()
