"""`mlx-specdec bench-prefix`: time to first token of a follow-up chat turn, cold vs served from
the prefix cache, on shared contexts of given sizes.

Each context is a system prompt of Python standard-library source (text every machine has) cut
to about N tokens, a first question, the model's answer, and a follow-up question: what a chat
client or agent resends on its second turn. Per trial, a fresh cache sees the first turn (not
timed); then the follow-up is timed warm (from that cache) and cold (no cache), from the call to
the first streamed token, chat-template rendering included. Medians over trials; the warm and
cold answers must be identical token for token.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from typing import Any

from ..autocap import machine_info
from ..cli import add_model_arguments, load_pair_from_args
from ..errors import SpecDecError
from ..generate import encode_prompt, stream_speculative_generate
from ..prefix_cache import PrefixCache
from .report import machine_line


def shared_context(tokenizer: Any, tokens: int) -> str:
    """Standard-library source, whole lines, about `tokens` tokens long."""
    import argparse as source_module  # a long, stable file on every Python

    lines = inspect.getsource(source_module).splitlines()
    text, n, step = "", 0, 40
    while n < len(lines):
        candidate = "\n".join(lines[: n + step])
        if len(encode_prompt(tokenizer, candidate, chat=False)) > tokens:
            if step == 1:
                break
            step = max(1, step // 4)
            continue
        text, n = candidate, n + step
    if not text:
        raise SpecDecError(f"cannot build a context of {tokens} tokens")
    return text


def conversation(context: str, reply: str | None = None) -> list[dict[str, str]]:
    messages = [
        {"role": "system", "content": f"You answer questions about this code.\n\n{context}"},
        {"role": "user", "content": "What does the first class do?"},
    ]
    if reply is not None:
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And the second one?"},
        ]
    return messages


def timed_turn(pair: tuple, messages: list[dict], cache: PrefixCache | None, **kwargs: Any):
    """(seconds to the first token, the GenerationResult)."""
    target, tokenizer, drafter = pair
    t0 = time.perf_counter()
    first = None
    for chunk in stream_speculative_generate(
        target, tokenizer, drafter, messages, prefix_cache=cache, **kwargs
    ):
        first = first or time.perf_counter()
        if chunk.result is not None:
            return first - t0, chunk.result
    raise AssertionError("the stream ended without a result")


def measure(pair: tuple, context_tokens: int, trials: int, max_new_tokens: int) -> dict[str, Any]:
    _, tokenizer, _ = pair
    kwargs = dict(max_new_tokens=max_new_tokens, enable_thinking=False)
    context = shared_context(tokenizer, context_tokens)
    _, first = timed_turn(pair, conversation(context), None, **kwargs)
    follow_up = conversation(context, first.text)
    timed_turn(pair, follow_up, None, **kwargs)  # warm-up, not counted
    cold_s, warm_s, cached, same = [], [], 0, True
    for _ in range(trials):
        cache = PrefixCache()
        timed_turn(pair, conversation(context), cache, **kwargs)
        seconds, warm = timed_turn(pair, follow_up, cache, **kwargs)
        warm_s.append(seconds)
        seconds, cold = timed_turn(pair, follow_up, None, **kwargs)
        cold_s.append(seconds)
        cached = warm.cached_tokens
        same = same and warm.tokens == cold.tokens
    cold_ms, warm_ms = statistics.median(cold_s) * 1000, statistics.median(warm_s) * 1000
    return {
        "context_tokens": context_tokens,
        "prompt_tokens": cold.prompt_tokens,
        "cached_tokens": cached,
        "cold_ttft_ms": round(cold_ms, 2),
        "warm_ttft_ms": round(warm_ms, 2),
        "speedup": round(cold_ms / warm_ms, 2),
        "identical": same,
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| shared context | prompt tokens | from cache | cold TTFT | warm TTFT | speed-up "
        "| same tokens |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        out.append(
            f"| ~{r['context_tokens']} | {r['prompt_tokens']} | {r['cached_tokens']} | "
            f"{r['cold_ttft_ms']:.1f} ms | {r['warm_ttft_ms']:.1f} ms | {r['speedup']:.1f}x | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--contexts", default="750,4000", help="shared context sizes, tokens (default 750,4000)"
    )
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(x) for x in args.contexts.split(",")]
    except ValueError:
        raise SpecDecError(
            f"--contexts wants token counts like 750,4000, got {args.contexts!r}"
        ) from None
    if min(sizes) < 16 or args.trials < 1 or args.max_new_tokens < 1:
        raise SpecDecError("--contexts must be >= 16 tokens, --trials and --max-new-tokens >= 1")
    target, tokenizer, drafter, config = load_pair_from_args(args)
    pair = (target, tokenizer, drafter)
    rows = []
    for n in sizes:
        rows.append(measure(pair, n, args.trials, args.max_new_tokens))
        print(f"  ~{n} tokens done", file=sys.stderr)
    machine = machine_info()
    mode = drafter.kind if drafter else "baseline"
    print(machine_line(machine))
    print(f"pair: {config.target} + {config.drafter or 'no drafter'} ({mode})\n")
    print(table(rows))
    if args.json:
        report = {"machine": machine, "mode": mode, "model": config.target, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r["identical"] for r in rows) else 1
