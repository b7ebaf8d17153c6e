"""`mlx-specdec train-drafter`'s command line: its arguments and entry point."""

from __future__ import annotations

import argparse
import time

from .loop import train_drafter
from .options import TrainOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainOptions(model="", out="")
    p.add_argument("--model", required=True, help="target: Hugging Face repo id or local folder")
    p.add_argument("--kind", choices=["dspark", "dflash"], default="dspark")
    p.add_argument(
        "--layout",
        choices=["deepspec", "zlab"],
        help="checkpoint layout (dspark: deepspec; dflash: zlab, z-lab's DFlashDraftModel, "
        "the default, or deepspec)",
    )
    p.add_argument("--out", required=True, help="folder for the drafter checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="JSONL of chat prompts the target answers")
    src.add_argument("--corpus", help="folder of text files whose snippets the target continues")
    src.add_argument("--data", help="train_data.jsonl of an earlier run (skips generation)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--resume", action="store_true", help="continue from the state in --out")
    p.add_argument("--samples", type=int, default=d.samples, help="training sequences to generate")
    p.add_argument("--gen-tokens", type=int, default=d.gen_tokens)
    p.add_argument(
        "--prompt-tokens", type=int, default=d.prompt_tokens, help="corpus snippet length"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--anchors", type=int, default=d.anchors, help="blocks per sequence")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--draft-layers", type=int, default=d.draft_layers)
    p.add_argument(
        "--draft-heads", type=int, help="draft layers' attention heads (default: target's)"
    )
    p.add_argument(
        "--draft-kv-heads", type=int, help="draft layers' KV heads (default: --draft-heads)"
    )
    p.add_argument(
        "--draft-intermediate", type=int, help="draft layers' MLP width (default: target's)"
    )
    p.add_argument("--markov-rank", type=int, default=d.markov_rank)
    p.add_argument(
        "--taps",
        type=lambda s: [int(x) for x in s.split(",")],
        help="target layers to tap, e.g. 1,9,17,25,33 (default: 5 spread over depth)",
    )
    p.add_argument("--mask-token-id", type=int)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="sampling temperature of the training text",
    )
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)


def run(args: argparse.Namespace) -> int:
    fields = TrainOptions.__dataclass_fields__
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in fields})
    start = time.perf_counter()
    result = train_drafter(opts)
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    print(
        f"{opts.kind} drafter written to {result.out} ({result.steps_done} steps, "
        f"loss {first:.3f} -> {last:.3f}, {time.perf_counter() - start:.0f} s)"
    )
    print(f"use it: mlx-specdec generate --model {opts.model} --drafter {result.out} --prompt ...")
    return 0
