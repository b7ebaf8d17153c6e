"""`mlx-specdec serve`: the OpenAI-compatible server from the command line."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import (
    add_model_arguments,
    add_sampling_arguments,
    load_pair_from_args,
    positive_int,
    resolve_draft_cap,
)
from ..errors import SpecDecError

HELP = "serve OpenAI- and Anthropic-compatible APIs (chat, completions, messages, responses)"
DEMO_MODEL_NAME = "mlx-specdec-demo"  # the model id when no --model is given


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    # The default cap is `auto`, as in `generate`: read from the per-machine cache, or measured
    # once at start-up. `--max-draft 0` serves the full block (what the Python API does by
    # default), e.g. to match speculative_generate's round counts and seeded samples exactly.
    add_sampling_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key",
        default=os.environ.get("MLX_SPECDEC_API_KEY"),
        help="require this key on every route but /health (default: $MLX_SPECDEC_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        help=f"model id clients see (default: --model, or {DEMO_MODEL_NAME} without one)",
    )
    p.add_argument("--no-thinking", action="store_true", help="thinking off unless asked for")
    p.add_argument(
        "--max-queue", type=positive_int, default=16, help="requests that may wait; more get 503"
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=1,
        metavar="N",
        help="requests decoded together in batched speculative rounds, each one's output what "
        "it is alone (default 1: one at a time; dense targets only; no prefix cache)",
    )
    p.add_argument(
        "--max-tokens", type=positive_int, default=512, help="when a request gives no max_tokens"
    )
    p.add_argument(
        "--max-tokens-limit", type=positive_int, default=8192, help="largest max_tokens accepted"
    )
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body, in MiB")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser pages from this origin (repeatable; none by default)",
    )
    p.add_argument(
        "--raw-special-tokens",
        action="store_true",
        help="read the chat template's special tokens written in messages as those tokens "
        "(default: as plain text, so no message can open a turn of another role)",
    )
    p.add_argument(
        "--response-store",
        type=int,
        default=256,
        metavar="N",
        help="responses kept for the Responses API's previous_response_id (default 256; the "
        "least recently used go first; 0 keeps none)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cache = p.add_argument_group("prefix cache (reuse the KV of conversations' shared prefixes)")
    cache.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt anew")
    cache.add_argument(
        "--prefix-cache-max-ram-mb",
        type=float,
        default=2048,
        help="RAM kept for cached prefixes, MiB (default 2048); the least recently used go first",
    )
    cache.add_argument(
        "--prefix-cache-dir", help="spill entries evicted from RAM to this folder (safetensors)"
    )
    cache.add_argument(
        "--prefix-cache-max-disk-mb",
        type=float,
        default=16384,
        help="disk kept in --prefix-cache-dir, MiB (default 16384); the oldest files go first",
    )


def batch_cap_rule(target, drafter, args: argparse.Namespace):  # noqa: ANN001, ANN201
    """With --max-batch > 1 and --max-draft auto: the cap per batch size (0: plain batched
    decoding), measured once per machine and cached (`autocap.batch_caps`); else None."""
    if args.max_batch == 1 or drafter is None or args.max_draft != "auto" or not drafter.tap_ids:
        return None
    from ..autocap import batch_caps, cache_file, cap_for_batch
    from ..cli import cap_cache_folder

    sizes = sorted({2**i for i in range(args.max_batch.bit_length()) if 2**i <= args.max_batch})
    note = lambda line: print(line, file=sys.stderr)  # noqa: E731
    caps = batch_caps(target, drafter, sizes, cap_cache=cache_file(cap_cache_folder()), notify=note)
    shown = ", ".join(f"{b} rows: {c or 'plain'}" for b, c in caps.items())
    note(f"mlx-specdec: draft cap per batch size ({shown})")
    return cap_for_batch(caps)


def run(args: argparse.Namespace) -> int:
    try:
        from .app import ServerSettings, create_app
        from .engine import Engine
        from .shutdown import serve
    except ImportError as e:
        raise SpecDecError(
            f"the server needs extra packages ({e.name} is missing): "
            "pip install 'mlx-specdec[server]'"
        ) from None
    from ..sampling import SamplingParams
    from ..speculate import check_max_draft

    if args.max_tokens > args.max_tokens_limit:
        raise SpecDecError("--max-tokens cannot be above --max-tokens-limit")
    if args.max_body_mb <= 0:
        raise SpecDecError("--max-body-mb must be > 0")
    if args.response_store < 0:
        raise SpecDecError("--response-store must be >= 0")
    if getattr(args, "sharding", None) and args.max_batch > 1:
        raise SpecDecError("--max-batch above 1 does not run with --sharding (yet)")
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p, args.seed)
    prefix_cache = None  # built first: a bad folder or size fails before the model loads
    if not args.no_prefix_cache:
        from ..prefix_cache import PrefixCache

        prefix_cache = PrefixCache(
            args.prefix_cache_max_ram_mb, args.prefix_cache_dir, args.prefix_cache_max_disk_mb
        )
    # The confidence threshold goes to the drafter; the environment's Target switches too.
    target, tokenizer, drafter, config = load_pair_from_args(args)
    max_draft = resolve_draft_cap(target, drafter, args.max_draft)
    if drafter is not None:
        check_max_draft(max_draft, drafter)  # fail at start, not on every request
        from ..doctor import startup_check  # is greedy output plain decoding's here? (logged)

        print(f"mlx-specdec: {startup_check(target)}", file=sys.stderr)
    engine_class = Engine
    if getattr(args, "sharding", None):  # rank 0 serves; the other ranks follow its requests
        from .sharded import ShardedEngine, follow

        if target.group.rank() != 0:
            return follow(target, tokenizer, drafter, max_draft)
        engine_class, prefix_cache = ShardedEngine, None
    engine = engine_class(
        target,
        tokenizer,
        drafter,
        config,
        max_queue=args.max_queue,
        max_draft=max_draft,
        prefix_cache=None if args.max_batch > 1 else prefix_cache,
        max_batch=args.max_batch,
        cap_for=batch_cap_rule(target, drafter, args),
    )
    settings = ServerSettings(
        model_name=args.served_model_name or args.model or DEMO_MODEL_NAME,
        api_key=args.api_key or None,
        enable_thinking=False if args.no_thinking else None,
        default_max_tokens=args.max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        cors_origins=args.cors_origin,
        raw_special_tokens=args.raw_special_tokens,
        response_store=args.response_store,
        sampling={
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "seed": sampling.seed,
        },
    )
    drafter_note = f"{config.mode} drafter {config.drafter}" if drafter else "no drafter"
    print(
        f"mlx-specdec: serving {settings.model_name} ({drafter_note}) at "
        f"http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    serve(create_app(engine, settings), engine, args.host, args.port, args.log_level)
    return 0
