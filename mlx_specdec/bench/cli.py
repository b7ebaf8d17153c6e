"""The `mlx-specdec bench` subcommand: its flags and where a run goes (real models, the demo
pair when no --model is given, or --synthetic shapes)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..autocap import cache_file
from ..cli import (
    EXTERNAL_COMMANDS,
    add_exact_argument,
    add_sharding_arguments,
    cap_cache_folder,
)
from ..errors import SpecDecError
from .run import ALL_MODES, demo_pair_args, run_bench
from .synthetic import SHAPES, run_synthetic


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="target: Hugging Face repo id or local folder (default: the embedded demo pair, "
        "with its drafters and its draft LM)",
    )
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
    add_exact_argument(p)
    p.add_argument(
        "--draft-model",
        metavar="SMALL_LM",
        help="a small LM for mlx-lm's own --draft-model speculation (mode draft-model)",
    )
    p.add_argument(
        "--prompts",
        default="chat,code,math",
        help="built-in sets (chat, code, math, edit: copy-heavy code edits) or a JSONL file of "
        '{"prompt": ..., "domain": ...}',
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
    p.add_argument(
        "--lookup-switch",
        metavar="N[,N...]",
        help="modes MODE+lookup: the match lengths from which a round uses the lookup draft, "
        "one row each (default: 2 on the CPU backend, 8 on a GPU)",
    )
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-thinking", action="store_true", help="chat template without thinking")
    p.add_argument("--cost-reps", type=int, default=5, help="timed repeats per cost-model point")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="speed-ups and cost curves (matplotlib)")
    d = p.add_argument_group("a target split across the ranks of mlx.launch (bench/split.py)")
    add_sharding_arguments(d)
    d.add_argument(
        "--placements",
        default="replicated",
        help="with --sharding: where the drafter runs, replicated and/or rank0 (its drafts sent "
        "to the other ranks each round)",
    )
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
    if args.sharding:
        from .split import run_rank

        return run_rank(args)
    if args.synthetic:
        if args.temperature != 0:
            raise SpecDecError(
                "--synthetic imposes acceptance through greedy verification; "
                "--temperature applies to real models only"
            )
        return run_synthetic(args)
    if not args.model:
        args = demo_pair_args(args)
    return run_bench(args, cache_file(cap_cache_folder()))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mlx_specdec.bench ...`: the same command without the other subcommands."""
    _, about = EXTERNAL_COMMANDS["bench"]
    parser = argparse.ArgumentParser(prog="mlx-specdec bench", description=about)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except SpecDecError as e:
        print(f"mlx-specdec: error: {e}", file=sys.stderr)
        return 2
