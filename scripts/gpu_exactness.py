"""Issue 18's measurements on a random-weight real-shape target (docs/exactness.md): run on the
GPU machine, where a verify's rows round otherwise than the decode step's.

1. `mlx-specdec doctor` on the synthetic target: per op and per path, exact or not.
2. The verify cost, K = 1..8 rows, normal and `--exact`, at two context lengths.
3. Greedy outputs over N prompts: mlx-lm's plain `generate_step` against our loop, normal and
   exact, and against mlx-lm run again (the control: is plain decoding itself reproducible?).
   With a random DSpark-shaped drafter acceptance is about 0, so every round's first row is
   the one checked. Each differing output is located, with its margin in ulps.

    python scripts/gpu_exactness.py --shape qwen3-4b --bits 8 --prompts 50 --json out.json
    python scripts/gpu_exactness.py --model DEMO_BF16 --drafter mlx_specdec/demo/dspark \\
        --prompt-file mlx_specdec/demo/prompts.jsonl --prompts 120 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import random
import time

import mlx.core as mx

from mlx_specdec.autocap import measure_costs
from mlx_specdec.bench.synthetic import synthetic_pair
from mlx_specdec.divergence import find_divergence
from mlx_specdec.doctor import run_doctor
from mlx_specdec.generate import baseline_steps
from mlx_specdec.loading import load_drafter, load_target
from mlx_specdec.sampling import SamplingParams
from mlx_specdec.speculate import speculate


def greedy(target, drafter, ids: list[int], n: int, cap: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    if drafter is None:
        out = [t for s in baseline_steps(target, ids, n, SamplingParams(), set()) for t in s.tokens]
    else:
        out = [
            t
            for s in speculate(target, drafter, ids, max_new_tokens=n, max_draft=cap)
            for t in s.tokens
        ]
    return out[:n], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-4b")
    ap.add_argument("--model", help="a local target folder instead of a synthetic one")
    ap.add_argument("--drafter", help="with --model: its drafter folder")
    ap.add_argument("--prompt-file", help='JSONL of {"prompt": ...} (default: random ids)')
    ap.add_argument(
        "--rows",
        default="normal,exact,again",
        help="outputs to compare with mlx-lm's: normal, exact, again (mlx-lm rerun)",
    )
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=7)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--skip", default="", help="comma list of doctor,costs,outputs to skip")
    ap.add_argument("--only", type=int, help="compare outputs of this prompt (0-based) alone")
    ap.add_argument("--json")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    report: dict = {
        "shape": args.shape,
        "bits": args.bits,
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
    }
    t0 = time.perf_counter()
    tokenizer = None
    if args.model:
        target, tokenizer = load_target(args.model)
        drafter = load_drafter(args.drafter, target, bits=32)[0]
        target.set_taps(drafter.tap_ids)
        report["shape"] = args.model
    else:
        target, drafter = synthetic_pair(args.shape, args.bits, 4)
    print(f"built {report['shape']} in {time.perf_counter() - t0:.1f} s", flush=True)

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    if "doctor" not in skip:
        doc = run_doctor(target, (2, 4, 7, 8), (8, 300, 1100))
        print("\n".join(doc.lines()), flush=True)
        report["doctor"] = doc.to_json()
        save()

    if "costs" not in skip:
        report["verify_ms"] = {}
        for ctx in (int(c) for c in args.contexts.split(",")):
            for exact in (False, True):
                target.use_exact(exact)
                cm = measure_costs(target, None, ctx, max_width=8, reps=5)
                key = f"{ctx}{'/exact' if exact else ''}"
                report["verify_ms"][key] = cm.verify_ms
                row = " ".join(f"{cm.verify_ms[k]:.2f}" for k in sorted(cm.verify_ms))
                print(f"verify ms K=1..8, context {key}: {row}", flush=True)
        target.use_exact(False)
        save()

    if "outputs" not in skip:
        rng = random.Random(0)
        if args.prompt_file:
            with open(args.prompt_file) as f:
                texts = [json.loads(line)["prompt"] for line in f if line.strip()]
            prompts = [tokenizer.encode(t) for t in texts][: args.prompts]
        else:
            prompts = [
                [rng.randrange(target.vocab_size) for _ in range(rng.randint(8, 600))]
                for _ in range(args.prompts)
            ]
        if args.only is not None:
            prompts = [prompts[args.only]]
        names = args.rows.split(",")
        rows = {n: {"differ": 0, "near_ties": 0, "seconds": 0.0, "where": []} for n in names}
        for exact in (False, True):
            target.use_exact(exact)
            greedy(target, drafter, prompts[0][:32], 8, args.max_draft)  # compile, excluded
        target.use_exact(False)
        base_s = 0.0
        for i, ids in enumerate(prompts):
            ref, s = greedy(target, None, ids, args.max_new_tokens, 0)
            base_s += s
            for name in names:
                target.use_exact(name == "exact")
                out, s = greedy(
                    target,
                    None if name == "again" else drafter,
                    ids,
                    args.max_new_tokens,
                    args.max_draft,
                )
                target.use_exact(False)
                r = rows[name]
                r["seconds"] += s
                d = find_divergence(target.model, ids, ref, out)
                if d is not None:
                    r["differ"] += 1
                    r["near_ties"] += d.near_tie
                    r["where"].append({"prompt": i, "length": len(ids), **d.to_json()})
            counts = ", ".join(f"{n} {r['differ']}" for n, r in rows.items())
            print(f"prompt {i + 1}/{len(prompts)}: outputs differing so far: {counts}", flush=True)
            report["outputs"] = {
                "prompts": i + 1,
                "max_new_tokens": args.max_new_tokens,
                "max_draft": args.max_draft,
                "baseline_seconds": base_s,
                **rows,
            }
            save()
        for name, r in rows.items():
            print(
                f"{name}: {r['differ']}/{len(prompts)} outputs differ ({r['near_ties']} at "
                f"near-ties), {r['seconds']:.1f} s against mlx-lm's {base_s:.1f} s"
            )


if __name__ == "__main__":
    main()
