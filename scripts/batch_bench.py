"""Batched rounds on the demo pair, without a server (what docs/bench.md quotes).

    python scripts/batch_bench.py                 # both tables
    python scripts/batch_bench.py --rows 1,2,4,8 --tokens 96

1. Aggregate tok/s of B requests decoded together (`batch.generate_batch`) at draft caps
   (`--caps`; 0 = plain batched decoding, no drafter call), next to the same B requests run one
   after another through `speculate` (ours unbatched): where speculation stops paying as B
   grows is the crossover the cost model (`autocap.batch_caps`) has to find. The last column is
   mlx-lm's own `BatchGenerator` (plain batched decoding) on the same target and prompts.
2. The decode gap a joining prompt causes: the longest wait between two rounds of requests
   already decoding while a long prompt joins, with the prefill in chunks and in one piece.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from mlx_specdec import load_pair
from mlx_specdec.batch import BatchDecoder, Request, generate_batch
from mlx_specdec.demo import DEMO_DIR
from mlx_specdec.speculate import speculate


def demo_prompts(tokenizer, n: int) -> list[list[int]]:  # noqa: ANN001
    lines = (DEMO_DIR / "prompts.jsonl").read_text().splitlines()
    return [tokenizer.encode(json.loads(line)["prompt"]) for line in lines[:n]]


def best_rate(run, repeats: int) -> float:  # noqa: ANN001
    """Tokens per second of `run()` (which returns its token count), the best of `repeats`: on a
    shared machine the fastest repeat is the one least slowed by other jobs."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def throughput(target, drafter, prompts, rows, tokens, caps, repeats) -> None:  # noqa: ANN001
    caps_head = " | ".join(f"cap {c}" for c in caps)
    print(f"| rows | unbatched (speculate) | {caps_head} | mlx-lm BatchGenerator |")
    print("|---" * (len(caps) + 3) + "|")
    for b in rows:
        requests = [Request(ids, tokens) for ids in prompts[:b]]

        def alone(requests: list = requests) -> int:
            steps = (speculate(target, drafter, r.ids, max_new_tokens=tokens) for r in requests)
            return sum(len(s.tokens) for run in steps for s in run)

        def together(cap: int, requests: list = requests) -> int:
            out = generate_batch(target, drafter, requests, cap_for=lambda _: cap)
            return sum(map(len, out))

        def mlx_lm(requests: list = requests) -> int:
            gen = BatchGenerator(target.model, max_tokens=tokens)
            gen.insert([r.ids for r in requests], max_tokens=[tokens] * len(requests))
            n = 0
            while answers := gen.next_generated():
                n += len(answers)
            return n

        cells = [f"{best_rate(alone, repeats):.0f}"]
        cells += [f"{best_rate(lambda c=cap: together(c), repeats):.0f}" for cap in caps]
        cells.append(f"{best_rate(mlx_lm, repeats):.0f}")
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


def decode_gap(target, drafter, prompts, chunk: int, long_len: int) -> float:  # noqa: ANN001
    """The longest time between two steps that gave the decoding rows tokens, while a
    `long_len`-token prompt joins."""
    decoder = BatchDecoder(target, drafter, prefill_chunk=chunk)
    for ids in prompts[:3]:
        decoder.add(Request(ids, 10_000))
    while any(not r.decoding for r in decoder.rows.values()):
        decoder.step()
    decoder.step()
    long = mx.random.randint(5, 400, (long_len,), key=mx.random.key(1)).tolist()
    decoder.add(Request(long, 4), uid=-1)
    gaps, last = [], time.perf_counter()
    while -1 in decoder.rows:
        decoder.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return max(gaps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--caps", default="0,1,3,5,7", help="draft caps to time (0: plain batched)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per cell")
    p.add_argument("--long-prompt", type=int, default=1536)
    args = p.parse_args()
    target, tokenizer, drafter, _ = load_pair(mode="dspark")
    rows = [int(r) for r in args.rows.split(",")]
    prompts = demo_prompts(tokenizer, max(rows))
    caps = [int(c) for c in args.caps.split(",")]
    throughput(target, drafter, prompts, rows, args.tokens, caps, args.repeats)
    print()
    print("| joining prompt | prefill | longest decode gap (ms) |")
    print("|---|---|---|")
    for chunk in (512, 128, args.long_prompt):
        gap = decode_gap(target, drafter, prompts, chunk, args.long_prompt)
        how = "one piece" if chunk >= args.long_prompt else f"chunks of {chunk}"
        print(f"| {args.long_prompt} tokens | {how} | {gap * 1000:.0f} |", flush=True)


if __name__ == "__main__":
    main()
