"""`mlx-specdec bench --synthetic SHAPE`: random-weight targets and DSpark drafters of the released
checkpoints' shapes, whose round acceptance follows a given profile, to measure the loop's cost
at scale without the weights. Acceptance is imposed (greedy verification is steered by
`ScriptedAcceptance`), not measured; every cost (forwards, drafter, cache, rollback) is real.
Hybrid shapes (Qwen3.6-27B / -35B-A3B-like: Gated DeltaNet and attention layers, dense or MoE)
also time what exact rollback of their recurrent layers costs (`recurrent_costs`).
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..autocap import expected_accept, geometric_survival, machine_info, measure_costs
from ..cli import blas_line, target_switches
from ..drafters.base import Drafter
from ..errors import SpecDecError
from ..generate import GenerationResult, baseline_steps, stream_steps
from ..sampling import SamplingParams
from ..speculate import speculate
from ..target import Target
from .report import command_line, cost_tables, fmt_table, machine_line, plot, write_json
from .rollback import recurrent_costs, rollback_table
from .run import Sample, parse_caps, summarize

# Mean accepted length per round (bonus included, block 7, non-thinking), DSpark paper Table 1,
# averaged per domain: chat = MT-Bench/Alpaca/Arena-Hard, code = MBPP/HumanEval/LCB,
# math = GSM8K/MATH/AIME25.
PAPER_ACCEPTANCE: dict[str, dict[str, float]] = {
    "qwen3-4b": {"chat": 3.49, "code": 5.12, "math": 5.57},
    "qwen3-8b": {"chat": 3.50, "code": 5.28, "math": 5.65},
}


def rate_for_accept_len(tau: float, block: int) -> float:
    """Per-position acceptance p with 1 + p + ... + p^block = tau (a flat, DSpark-like profile)."""
    if not 1.0 <= tau <= block + 1:
        raise SpecDecError(f"accept length {tau} is outside 1..{block + 1} for a block of {block}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 + sum(mid**k for k in range(1, block + 1)) < tau else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    taps: tuple[int, ...]
    mask_token: int
    family: str = "qwen3"  # the mlx-lm model type
    extra: dict[str, Any] = field(default_factory=dict)  # the family's other config keys


def _gated_delta(key_heads: int, value_heads: int, dim: int, **moe: Any) -> dict[str, Any]:
    """Qwen3.5 / 3.6 keys: Gated DeltaNet layers, every 4th layer full attention (gated)."""
    return dict(
        linear_num_key_heads=key_heads,
        linear_num_value_heads=value_heads,
        linear_key_head_dim=dim,
        linear_value_head_dim=dim,
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        rope_parameters={"type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        **moe,
    )


_QWEN36_MOE = dict(
    num_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
)

SHAPES: dict[str, Shape] = {
    # A small Qwen3 for CPUs (the shape of mlx-lm-notes A7, ~134M parameters).
    "small": Shape(1024, 8, 3072, 16, 8, 64, 32000, True, (1, 2, 4, 5, 6), 31999),
    "qwen3-4b": Shape(2560, 36, 9728, 32, 8, 128, 151936, True, (1, 9, 17, 25, 33), 151669),
    "qwen3-8b": Shape(4096, 36, 12288, 32, 8, 128, 151936, False, (1, 9, 17, 25, 33), 151669),
    # Hybrids. Qwen3.6-27B: 64 layers, 48 Gated DeltaNet + 16 full attention, hidden 5120.
    "qwen3.6-27b": replace(
        Shape(5120, 64, 17408, 24, 4, 256, 248320, False, (1, 16, 31, 46, 61), 248077),
        family="qwen3_5",
        extra=_gated_delta(16, 48, 128),
    ),
    # Qwen3.6-35B-A3B: 40 layers (30 + 10), 256 experts (8 routed + 1 shared of 512); the
    # intermediate size is the drafter's MLP (the target's layers are all MoE).
    "qwen3.6-35b-a3b": replace(
        Shape(2048, 40, 6144, 16, 2, 256, 248320, False, (1, 10, 19, 28, 37), 248077),
        family="qwen3_5_moe",
        extra=_gated_delta(16, 32, 128, **_QWEN36_MOE),
    ),
    # A small hybrid for CPUs: the "small" Qwen3's widths, 6 of its 8 layers Gated DeltaNet.
    "hybrid-small": replace(
        Shape(1024, 8, 3072, 8, 4, 128, 32000, True, (1, 2, 4, 5, 6), 31999),
        family="qwen3_5",
        extra=_gated_delta(8, 16, 64),
    ),
}
DSPARK_BLOCK, DSPARK_LAYERS, DSPARK_RANK = 7, 5, 256  # the released DSpark drafters


def synthetic_pair(
    name: str, target_bits: int, drafter_bits: int, **switches: bool | None
) -> tuple[Target, Drafter]:
    """Random-weight target (Qwen3, or a Qwen3.5-style hybrid) and DSpark drafter of the
    released checkpoints' shapes; `switches` are `Target`'s (`stand_ins`, `padded_attention`)."""
    from ..drafters.dspark import DSparkConfig, DSparkDrafter
    from ..drafters.layers import quantize_drafter
    from ..kernels import weight_sharing_copy

    s = SHAPES[name]
    family = importlib.import_module(f"mlx_lm.models.{s.family}")
    mx.random.seed(0)
    base = dict(
        model_type="qwen3",
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        vocab_size=s.vocab,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        tie_word_embeddings=s.tied,
    )
    config = {**base, "model_type": s.family, **s.extra}
    model = family.Model(family.ModelArgs.from_dict(config))
    # bf16 as released; but MLX's CPU bf16 kernels are ~10x slower than fp32, so a CPU run keeps
    # fp32 activations (and quantization scales) unless 16 bits are asked for.
    on_cpu = mx.default_device() == mx.cpu
    dtype = mx.bfloat16 if target_bits == 16 or not on_cpu else mx.float32
    model.set_dtype(dtype)
    if target_bits in (4, 8):
        nn.quantize(model, group_size=64, bits=target_bits)
        config["quantization"] = {"group_size": 64, "bits": target_bits}
    mx.eval(model.parameters())
    target = Target(model, config, name=f"synthetic-{name}", **switches)
    dcfg = {  # Qwen3 layers of the target's widths, whatever the target's layers are
        **base,
        "num_hidden_layers": DSPARK_LAYERS,
        "block_size": DSPARK_BLOCK,
        "mask_token_id": s.mask_token,
        "target_layer_ids": list(s.taps),
        "num_target_layers": s.layers,
        "markov_rank": DSPARK_RANK,
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "architectures": ["Qwen3DSparkModel"],
    }
    drafter = DSparkDrafter(DSparkConfig.from_dict(dcfg))
    drafter.set_dtype(dtype)
    # The released drafters' embedding and head equal the target's, so the loader shares them;
    # random copies never compare equal, so share them directly (same effect on cost).
    drafter.pop("embed_tokens")
    drafter.pop("lm_head")
    drafter._shared.update(embed_tokens=target.embed_tokens, lm_head=target.head)
    quantize_drafter(drafter, drafter_bits)
    mx.eval(drafter.parameters())
    if target.stand_ins:  # as the loader does: the drafter runs the CPU stand-ins with the target
        drafter = weight_sharing_copy(drafter, stand_ins=True)
    target.set_taps(drafter.tap_ids)
    return target, drafter


class ScriptedAcceptance:
    """Stands in for the target in the unchanged verify loop: runs the real forward (full cost),
    then overrides the logits so greedy verification accepts exactly as many drafts as the
    profile draws (each position accepted with probability `p`, stop at the first rejection).
    Everything else (prefill, cache, rollback, taps) is the real target's."""

    def __init__(self, target: Target, p: float, seed: int = 0):
        self._target, self._p, self._rng = target, p, random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def __call__(self, ids: mx.array, cache: list[Any], *, last_only: bool = False):
        logits, taps = self._target(ids, cache, last_only=last_only)
        n = ids.shape[0] - 1
        if last_only or n < 1:
            return logits, taps
        a = 0
        while a < n and self._rng.random() < self._p:
            a += 1
        drafts = ids[1:].astype(mx.int32)
        vocab = logits.shape[-1]
        # Rows < a agree with the drafts; row a disagrees (a correction); later rows are unused.
        want = mx.concatenate([drafts[:a], (drafts[a:] + 1) % vocab, drafts[-1:]])
        hit = mx.arange(vocab)[None] == want[:, None]
        return mx.where(hit, mx.array(1e4, logits.dtype), logits), taps


class _NullTokenizer:
    """Enough of a tokenizer for `stream_steps` when the ids mean nothing (synthetic mode)."""

    eos_token_ids: list[int] = []

    class _Detok:
        text = ""
        last_segment = ""

        def reset(self) -> None: ...
        def add_token(self, t: int) -> None: ...
        def finalize(self) -> None: ...

    detokenizer = _Detok()


def _run_synthetic_row(
    target: Any, drafter: Drafter | None, ids: list[int], max_new: int, cap: int | None
) -> GenerationResult:
    tok = _NullTokenizer()
    if drafter is None:
        steps = baseline_steps(target, ids, max_new, SamplingParams(), set())
    else:
        spec = speculate(target, drafter, ids, max_new_tokens=max_new, max_draft=cap)
        steps = ((s.tokens, s.round) for s in spec)
    *_, last = stream_steps(tok, steps, len(ids), max_new, "synthetic", {})
    assert last.result is not None
    return last.result


def parse_acceptance(text: str | None, shape: str) -> dict[str, float]:
    if not text:
        return dict(PAPER_ACCEPTANCE.get(shape, PAPER_ACCEPTANCE["qwen3-4b"]))
    out = {}
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        label, sep, value = part.rpartition("=")
        try:
            out[label if sep else f"level{i + 1}"] = float(value)
        except ValueError:
            raise SpecDecError(f"--acceptance: '{part}' is not NAME=LENGTH or LENGTH") from None
    if not out:
        raise SpecDecError("--acceptance is empty")
    return out


def run_synthetic(args: argparse.Namespace) -> int:
    machine = machine_info()
    print(machine_line(machine), flush=True)
    levels = parse_acceptance(args.acceptance, args.synthetic)
    rates = {k: rate_for_accept_len(v, DSPARK_BLOCK) for k, v in levels.items()}
    caps = parse_caps(args.max_draft)
    if any(c != "auto" and c > DSPARK_BLOCK for c in caps):
        raise SpecDecError(f"--max-draft: the DSpark block is {DSPARK_BLOCK}")
    t0 = time.perf_counter()
    target, drafter = synthetic_pair(
        args.synthetic, args.target_bits, args.drafter_bits, **target_switches()
    )
    if args.exact:
        target.use_exact()
    if line := blas_line():  # after building, so that an error stays one line
        print(line, file=sys.stderr)
    print(
        f"SYNTHETIC ACCEPTANCE (random weights; acceptance imposed, not measured): "
        f"{args.synthetic}-shaped target at {args.target_bits} bits, DSpark-shaped drafter "
        f"({DSPARK_LAYERS} layers, block {DSPARK_BLOCK}, Markov rank {DSPARK_RANK}) at "
        f"{args.drafter_bits} bits{'; exact verify' if args.exact else ''}; built in "
        f"{time.perf_counter() - t0:.1f} s; context "
        f"{args.context}, {args.max_new_tokens} new tokens, {args.trials} trials",
        flush=True,
    )
    rng = random.Random(args.seed)
    ids = [rng.randrange(target.vocab_size) for _ in range(args.context)]
    context_len = args.context + args.max_new_tokens // 2
    mean_tau = statistics.mean(levels.values())
    costs = measure_costs(
        target, drafter, context_len, context_rows=round(mean_tau), reps=args.cost_reps
    )
    rollback = None
    if target.recurrent_layers:
        rollback = recurrent_costs(target, context_len, reps=max(args.cost_reps, 5))

    plan: list[tuple[str, int]] = []
    for label, p in rates.items():
        for c in caps:
            cap = costs.best_cap(geometric_survival(p, DSPARK_BLOCK)) if c == "auto" else int(c)
            if (label, cap) not in plan:
                plan.append((label, cap))
    auto_caps = {
        label: costs.best_cap(geometric_survival(p, DSPARK_BLOCK)) for label, p in rates.items()
    }

    samples: list[Sample] = []
    _run_synthetic_row(target, None, ids, args.max_new_tokens, None)  # warm-up, excluded
    # Warm-up, excluded: every row once with the very acceptance draws its trials replay, so every
    # (verify width, context length) shape is met before timing (MLX CUDA compiles per shape).
    for label, cap in plan:
        _run_synthetic_row(
            ScriptedAcceptance(target, rates[label], seed=args.seed),
            drafter,
            ids,
            args.max_new_tokens,
            cap,
        )
    for trial in range(args.trials):
        r = _run_synthetic_row(target, None, ids, args.max_new_tokens, None)
        samples.append(Sample.of("baseline", "all", 0, trial, r))
        for label, cap in plan:
            scripted = ScriptedAcceptance(target, rates[label], seed=args.seed)
            r = _run_synthetic_row(scripted, drafter, ids, args.max_new_tokens, cap)
            samples.append(Sample.of(f"dspark@{cap}", label, 0, trial, r))
        print(f"  trial {trial + 1}/{args.trials} done", file=sys.stderr, flush=True)

    base = summarize(samples, "baseline", "all")
    assert base is not None
    stats = []
    body = []
    for label, cap in plan:
        st = summarize(samples, f"dspark@{cap}", label)
        assert st is not None
        pred = costs.predicted_tps(cap, st["accept_len"])
        ceiling = costs.predicted_tps(
            cap, expected_accept(geometric_survival(rates[label], DSPARK_BLOCK), cap)
        )
        st.update(
            row=f"dspark@{cap}",
            mode="dspark",
            cap=cap,
            domain=label,
            target_tau=levels[label],
            speedup=st["decode_tps"] / base["decode_tps"],
            predicted_tps=pred,
            efficiency=st["decode_tps"] / pred,
            auto=cap == auto_caps[label],
        )
        stats.append(st)
        body.append(
            [
                label,
                levels[label],
                f"{cap}{' (auto)' if st['auto'] else ''}",
                st["accept_len"],
                st["decode_tps"],
                pred,
                st["efficiency"],
                st["speedup"],
                ceiling / costs.baseline_tps,
            ]
        )
    print()
    print(
        f"baseline (mlx-lm generate_step, same random target): {base['decode_tps']:.1f} tok/s "
        f"decode, TTFT {base['ttft_ms']:.0f} ms"
    )
    print(
        fmt_table(
            [
                "profile",
                "tau@7",
                "cap",
                "accept",
                "decode tok/s",
                "predicted tok/s",
                "efficiency",
                "speed-up",
                "model speed-up",
            ],
            body,
        )
    )
    print(
        "\naccept = measured tokens per round; predicted = accept / (t_draft + t_verify(cap+1)) "
        "from the cost model below; efficiency = measured / predicted; model speed-up = the "
        "cost model's ceiling at the profile's expected accept length over its plain step"
    )
    print()
    surv = geometric_survival(statistics.mean(rates.values()), DSPARK_BLOCK)
    print(cost_tables(costs, surv, f"[synthetic {args.synthetic}, mean profile]"))
    if rollback is not None:
        print()
        print(rollback_table(rollback))
    print(machine_line(machine))
    report = {
        "kind": "synthetic-acceptance",
        "command": command_line(),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "shape": asdict(SHAPES[args.synthetic]),
        "levels": levels,
        "rates": rates,
        "baseline": base,
        "results": stats,
        "cost_model": {**costs.to_json(), "auto_caps": auto_caps},
        "recurrent_rollback": rollback,
    }
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(
            args.plot,
            stats,
            {"dspark": costs},
            f"SYNTHETIC {args.synthetic} | {machine_line(machine)}",
        )
    return 0
