"""`mlx-specdec` command line: generate, models, and the subcommands other modules add."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import SpecDecError

# Subcommands living in their own modules, each with add_arguments(parser) and run(args);
# a module is imported only when its subcommand runs.
EXTERNAL_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": (
        "mlx_specdec.bench.cli",
        "benchmark modes head to head: speed-up, acceptance, cost model, lossless verdict",
    ),
    "bench-prefix": (
        "mlx_specdec.bench.prefix",
        "time to first token of a follow-up turn, cold vs from the prefix cache",
    ),
    "bench-split": (
        "mlx_specdec.bench.split",
        "speculation over a target split across local ranks, plain vs drafter, with a slower link",
    ),
    "serve": (
        "mlx_specdec.server.cli",
        "serve OpenAI (chat, completions, responses) and Anthropic (messages) APIs",
    ),
    "doctor": (
        "mlx_specdec.doctor",
        "check that verify rows are bit-identical to plain decoding on this backend and model",
    ),
    "train-drafter": (
        "mlx_specdec.train.cli",
        "train a DSpark or DFlash drafter for a target (DeepSpec recipe, in MLX)",
    ),
}
# Commands that compute (restart with OpenBLAS on a Linux CPU, see `restart_with_openblas`).
COMPUTING = ("generate", *EXTERNAL_COMMANDS)
# Set by our own restart, so the restarted command can say it was restarted.
RESTARTED = "MLX_SPECDEC_RESTARTED_WITH"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def unit_interval(text: str) -> float:
    """A float in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number in [0, 1), got '{text}'") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def draft_cap(text: str) -> int | str | None:
    """--max-draft: N >= 1 verifies the first N drafts of a round; 0 means the drafter's full
    block (None); `auto` (the default) is the cap measured best for this model on this machine
    (cached; see `mlx_specdec.autocap.auto_max_draft`)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes an integer (0 = full block) or 'auto', got '{text}'"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = full block), got {value}")
    return value or None


def cap_cache_folder() -> str | None:
    """Where the CLI keeps the draft-cap cache: $MLX_SPECDEC_CACHE (tests point it at a
    temporary folder), else None for the default ~/.cache/mlx-specdec."""
    return os.environ.get("MLX_SPECDEC_CACHE")


def resolve_draft_cap(target, drafter, max_draft: int | str | None) -> int | None:
    """`--max-draft` for a loaded pair: `auto` becomes the cached cap for this model, precision
    and machine, or is calibrated once now (saying so on stderr); others pass through."""
    from .autocap import cache_file, resolve_max_draft

    if max_draft == "auto" and drafter is not None and not drafter.tap_ids:
        return None  # no taps (lookup): no drafter cost to model; it sizes its own rounds
    if getattr(target, "group", None) is not None:  # split: every rank must use one cap
        from .distributed import agreed_draft_cap

        folder = cap_cache_folder()
        return agreed_draft_cap(
            target, drafter, max_draft, cap_cache=cache_file(folder), notify=_note
        )
    if drafter is None or max_draft != "auto":
        return resolve_max_draft(target, drafter, max_draft)
    said: list[str] = []

    def note(line: str) -> None:
        said.append(line)
        _note(line)

    cap = resolve_max_draft(
        target, drafter, max_draft, notify=note, cap_cache=cache_file(cap_cache_folder())
    )
    how = "measured" if said else "cached"
    _note(
        f"[auto] --max-draft {cap} (of {drafter.max_draft}; {how} for this model on this machine)"
    )
    return cap


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def target_switches(env: Mapping[str, str] | None = None) -> dict[str, bool | None]:
    """The `Target` switches the environment sets (`load_pair`/`load_target` keywords):
    MLX_SPECDEC_CPU_KERNELS=0 turns the CPU stand-ins off, MLX_SPECDEC_PADDED_ATTENTION=0/1
    forces padded attention off/on. The one place these variables are read."""
    env = os.environ if env is None else env
    padded = env.get("MLX_SPECDEC_PADDED_ATTENTION")
    return {
        "stand_ins": False if env.get("MLX_SPECDEC_CPU_KERNELS") == "0" else None,
        "padded_attention": {"0": False, "1": True}.get(padded or ""),
    }


def load_pair_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """`load_pair` with the model flags (`add_model_arguments`), the confidence threshold and
    the environment's switches; then says on stderr what BLAS a CPU run uses."""
    from .loading import load_pair

    options = dict(
        mode=args.mode,
        drafter_bits=args.drafter_bits,
        confidence_threshold=getattr(args, "confidence_threshold", 0.0),
        lookup=getattr(args, "lookup", False),
        **target_switches(),
    )
    if getattr(args, "sharding", None):  # a target split across an mlx.launch's processes
        from .distributed import load_pair_sharded

        loaded = load_pair_sharded(
            args.sharding, args.model, args.drafter, rank_timeout=args.rank_timeout, **options
        )
    else:
        loaded = load_pair(args.model, args.drafter, **options)
    if loaded[2] is not None and (line := blas_line()):
        _note(line)
    if getattr(args, "exact", False):
        loaded[0].use_exact()
        _note(loaded[0].exact.describe())
    return loaded


def add_exact_argument(p: argparse.ArgumentParser) -> None:
    """--exact (generate, serve, bench)."""
    p.add_argument(
        "--exact",
        action="store_true",
        help="compute every verify row with plain decoding's own kernels, so greedy output is "
        "bit-identical to mlx-lm's on GPUs too (slower there; `mlx-specdec doctor` checks it)",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that pick and load a target/drafter pair (shared by generate, serve, bench)."""
    p.add_argument("--model", help="target: Hugging Face repo id or local folder")
    p.add_argument("--drafter", help="drafter repo id or folder (default: from the registry)")
    p.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "dspark", "dflash", "eagle3", "lookup", "baseline"],
        help="auto picks DSpark, else DFlash, else EAGLE3, else plain decoding; lookup needs no "
        "drafter: it drafts by copying from n-gram matches in the prompt and the output",
    )
    p.add_argument(
        "--lookup",
        action="store_true",
        help="with a drafter: rounds whose n-gram match is long use the lookup draft instead",
    )
    p.add_argument(
        "--drafter-bits",
        type=int,
        choices=[4, 8, 16, 32],
        help="quantize the drafter (16 = checkpoint dtype, 32 = float32; default: 4 on a GPU, "
        "32 on the CPU backend, where quantized matmuls are slow)",
    )
    add_exact_argument(p)
    add_sharding_arguments(p)


def add_sharding_arguments(p: argparse.ArgumentParser) -> None:
    """Split the target across the processes of `mlx.launch` (docs/distributed.md)."""
    p.add_argument(
        "--sharding",
        choices=["tensor", "pipeline"],
        help="under mlx.launch: split the target across the ranks, tensor (each layer) or "
        "pipeline (runs of layers) parallel, through mlx-lm's sharded_load",
    )
    p.add_argument(
        "--rank-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --sharding: give up, with one line, when another rank has not answered for "
        "this long (it died or hangs)",
    )


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling flags and --max-draft (default `auto`)."""
    p.add_argument(
        "--max-draft",
        type=draft_cap,
        default="auto",
        help="drafts verified per round: N, 0 = the full block, or auto (default: the cap "
        "measured fastest for this model on this machine, measured once and then cached)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--confidence-threshold",
        type=unit_interval,
        default=0.0,
        help="DSpark: cut each round's drafts at the first slot whose confidence is below this",
    )


def add_penalty_arguments(p: argparse.ArgumentParser) -> None:
    """mlx-lm's penalties, each over the last 20 tokens (the output stays plain decoding's)."""
    p.add_argument("--repetition-penalty", type=float, help="e.g. 1.1: damp repeated tokens")
    p.add_argument(
        "--presence-penalty", type=float, help="subtract from the logit of each recent token"
    )
    p.add_argument(
        "--frequency-penalty", type=float, help="subtract per occurrence among recent tokens"
    )


def system_openblas() -> str | None:
    """The path of the system's OpenBLAS (Debian/Ubuntu `libopenblas0-pthread` and similar)."""
    import glob

    found = sorted(glob.glob("/usr/lib/*/openblas-pthread/libopenblas.so.0"))
    found += sorted(glob.glob("/usr/lib*/libopenblas*.so.0"))
    return found[0] if found else None


def openblas_env(env: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to restart under so that MLX's CPU matmuls use `library` (an OpenBLAS),
    or None: none found, already preloaded, or turned off with MLX_SPECDEC_OPENBLAS=0.
    One OpenBLAS thread unless OPENBLAS_NUM_THREADS says otherwise (the README's setting)."""
    preload = env.get("LD_PRELOAD", "")
    if library is None or _openblas_preloaded(env) or env.get("MLX_SPECDEC_OPENBLAS") == "0":
        return None
    return {
        **env,
        "LD_PRELOAD": f"{library}:{preload}" if preload else library,
        "OPENBLAS_NUM_THREADS": env.get("OPENBLAS_NUM_THREADS", "1"),
    }


def _openblas_preloaded(env: Mapping[str, str]) -> bool:
    return "openblas" in env.get("LD_PRELOAD", "").lower()


def _on_linux_cpu() -> bool:
    import platform

    import mlx.core as mx

    return platform.system() == "Linux" and mx.default_device() == mx.cpu


def restart_with_openblas() -> None:
    """On a Linux CPU, MLX's bundled BLAS makes verifying K tokens cost about K plain steps, so
    speculation gains little or loses. A preloaded OpenBLAS fixes that, and the loader only
    reads LD_PRELOAD when a process starts: so the command restarts itself once with the
    system's OpenBLAS preloaded, when there is one (returns when there is nothing to do).
    MLX_SPECDEC_OPENBLAS=0 turns this off. The restarted command says so (`blas_line`)."""
    if not _on_linux_cpu():
        return
    library = system_openblas()
    env = openblas_env(os.environ, library)
    if env is None:
        return
    env[RESTARTED] = str(library)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "mlx_specdec", *sys.argv[1:]], env)
    except OSError:  # cannot restart (no interpreter path): carry on, `blas_line` says why
        return


def blas_line() -> str | None:
    """One line for stderr about the BLAS a Linux CPU run uses, said once the pair has loaded
    (so an error stays one line): that the command restarted itself with OpenBLAS, or, on
    MLX's bundled BLAS, what that costs and how to fix it. None elsewhere."""
    if not _on_linux_cpu():
        return None
    if library := os.environ.get(RESTARTED):
        return (
            f"mlx-specdec: restarted with OpenBLAS preloaded ({library}); "
            "MLX_SPECDEC_OPENBLAS=0 turns this off"
        )
    if _openblas_preloaded(os.environ):
        return None
    library = system_openblas()
    how = (
        f"LD_PRELOAD={library} OPENBLAS_NUM_THREADS=1 mlx-specdec ..."
        if library
        else "apt-get install libopenblas0-pthread (mlx-specdec then preloads it by itself), or "
        "run with LD_PRELOAD=<libopenblas.so.0> OPENBLAS_NUM_THREADS=1"
    )
    return (
        "mlx-specdec: note: on this Linux CPU MLX's bundled BLAS makes verifying several tokens "
        f"cost about as much as several plain steps, so speculation gains little or loses; use "
        f"OpenBLAS: {how}"
    )


def _generate(args: argparse.Namespace) -> int:
    from .generate import baseline_generate, encode_prompt, stream_speculative_generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    target, tokenizer, drafter, config = load_pair_from_args(args)
    if config.mode == "baseline" and args.mode == "auto":
        print(f"[auto] no drafter known for '{config.target}': plain decoding", file=sys.stderr)
    elif args.mode == "auto":
        print(f"[auto] {config.mode} drafter {config.drafter}", file=sys.stderr)
    max_draft = resolve_draft_cap(target, drafter, args.max_draft)
    thinking = False if args.no_thinking else None
    ids = encode_prompt(tokenizer, prompt, chat=not args.no_chat, enable_thinking=thinking)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )
    result = None
    for chunk in stream_speculative_generate(
        target,
        tokenizer,
        drafter,
        ids,
        max_draft=max_draft,
        **options,
    ):
        print(chunk.text, end="", flush=True)
        result = chunk.result or result
    print()
    print(result.stats_line())
    if args.compare:
        base = baseline_generate(target, tokenizer, ids, **options)
        print(base.stats_line())
        speedup = result.tokens_per_sec / base.tokens_per_sec if base.tokens_per_sec else 0.0
        verdict = _compare(target, ids, base, result, args)
        print(f"speed-up {speedup:.2f}x over mlx-lm generation; {verdict}")
    return 0


def _compare(target: Any, ids: list[int], base: Any, result: Any, args: argparse.Namespace) -> str:
    """Identical or where the outputs part; when greedy, whether at a near-tie of the target's
    logits (kernel rounding) or not (a bug), from the logits plain decoding computes there."""
    from .divergence import compare_line, first_difference
    from .sampling import GREEDY_TEMPERATURE

    if args.temperature >= GREEDY_TEMPERATURE:  # samples: the token-by-token verdict is greedy's
        where = first_difference(base.tokens, result.tokens)
        return "outputs identical" if where is None else f"outputs DIFFERENT from token {where}"
    return compare_line(target.model, ids, base.tokens, result.tokens)


def _models(args: argparse.Namespace) -> int:
    from .registry import MODES, REGISTRY

    def cell(entry, mode: str) -> str:
        d = getattr(entry, mode)
        return f"{d.repo} ({d.format})" if d else "-"

    rows = [("id", "target", *MODES, "runnable")]
    rows += [(e.id, e.target, *(cell(e, m) for m in MODES), e.runnable()) for e in REGISTRY]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\nAny quantization of a target (-4bit, -8bit, -bf16, ...) resolves the same drafters.")
    print("(format): the drafter's checkpoint format; runnable: whether this install can run it.")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; of the external subcommands only `command`'s module is imported (its flags
    are added), so that e.g. `models` loads nothing it does not need."""
    parser = argparse.ArgumentParser(
        prog="mlx-specdec", description="Lossless speculative decoding on MLX"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming")
    add_model_arguments(g)
    g.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    add_sampling_arguments(g)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--no-thinking", action="store_true", help="chat template without thinking")
    add_penalty_arguments(g)
    g.add_argument(
        "--compare", action="store_true", help="also run mlx-lm's plain generation and compare"
    )
    g.set_defaults(func=_generate)

    m = sub.add_parser("models", help="list known targets and their drafters")
    m.set_defaults(func=_models)

    for name, (module_name, help_text) in EXTERNAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    args = build_parser(command).parse_args(words)
    # A real command line (not a call from Python) that computes: restart it if that pays.
    if argv is None and args.command in COMPUTING:
        restart_with_openblas()
    try:
        if getattr(args, "sharding", None):  # one rank of an mlx.launch
            from .distributed import run_sharded

            return run_sharded(args.func, args)
        return args.func(args)
    except SpecDecError as e:
        print(f"mlx-specdec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmlx-specdec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
