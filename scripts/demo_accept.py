"""Greedy mean accept length and decode speed-up of the demo pair on its held-out prompts.

python scripts/demo_accept.py [--per-domain 10] [--max-new-tokens 128] [--drafter-bits 32]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from mlx_specdec.demo import DEMO_DIR
from mlx_specdec.generate import baseline_generate, speculative_generate
from mlx_specdec.loading import load_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="dspark")
    ap.add_argument("--per-domain", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--drafter-bits", type=int, default=32)
    args = ap.parse_args()
    target, tok, drafter, _ = load_pair(mode=args.mode, drafter_bits=args.drafter_bits)
    prompts = [json.loads(line) for line in (DEMO_DIR / "prompts.jsonl").read_text().splitlines()]
    by = defaultdict(list)
    for p in prompts:
        by[p["domain"]].append(p["prompt"])
    speculative_generate(target, tok, drafter, "warm up", max_new_tokens=16)  # compile/warm
    for domain, items in by.items():
        rounds = committed = 0
        spec_s = base_s = 0.0
        n_tok = 0
        for prompt in items[: args.per_domain]:
            r = speculative_generate(
                target, tok, drafter, prompt, max_new_tokens=args.max_new_tokens
            )
            b = baseline_generate(target, tok, prompt, max_new_tokens=args.max_new_tokens)
            assert r.tokens == b.tokens, f"output differs on {prompt!r}"
            rounds += len(r.rounds)
            committed += sum(len(x.committed) for x in r.rounds)
            spec_s += r.decode_seconds
            base_s += b.decode_seconds
            n_tok += len(r.tokens)
        print(
            f"{domain:6s} prompts {min(len(items), args.per_domain):3d}  tokens {n_tok:5d}  "
            f"accept {committed / max(rounds, 1):.2f}  speed-up {base_s / max(spec_s, 1e-9):.2f}x"
        )


if __name__ == "__main__":
    main()
