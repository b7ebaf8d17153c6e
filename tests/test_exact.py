"""The exact verify path (`Target.use_exact`, exact.py): each row of a K-row verify is bit-identical
to the decode step at its position, logits and cache contents, even through an op that computes
a row differently when it has company (as GPU kernels do)."""

from __future__ import annotations

import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import (
    GEMMA4_TARGETS,
    build_drafter,
    build_model,
    dspark_config,
    greedy_reference,
    run,
    target_config,
)
from hybrid_models import HYBRID_TARGETS, build_hybrid
from mlx_lm.models.cache import make_prompt_cache

from mlx_specdec.exact import (
    CPU_PLAN,
    ExactKVCache,
    ExactVerify,
    RowPlan,
    decode_scores,
    split_rows,
)
from mlx_specdec.target import Target

PER_ROW = RowPlan()  # the GPU plan, forced on the CPU: every row-variant op one row per call


class RowVariantLinear(nn.Linear):
    """A matmul whose rows change when it computes several at once, like MLX's GEMM next to its
    GEMV on a GPU, only far more (so that any row computed with company shows)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        return y * 1.01 if x.ndim >= 3 and x.shape[1] > 1 else y


def row_variant(model: nn.Module) -> nn.Module:
    """`model` with every dense matmul of its decoder made row-variant (in place)."""
    for _, m in model.named_modules():
        if type(m) is nn.Linear:
            m.__class__ = RowVariantLinear
    return model


def decode_steps(target: Target, prompt: mx.array, rows: mx.array):
    """K one-token forwards (the decode step) on mlx-lm's own cache after `target.prefill`."""
    cache = make_prompt_cache(target.model)
    target.prefill(prompt, cache)
    logits = mx.concatenate([target(rows[i : i + 1], cache)[0] for i in range(rows.shape[0])])
    return logits, cache


def verify(target: Target, prompt: mx.array, rows: mx.array):
    cache = target.make_cache()
    target.prefill(prompt, cache)
    logits, _ = target(rows, cache)
    return logits, cache


def assert_same_kv(a: list, b: list, upto: int) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.offset == y.offset == upto, i
        assert mx.array_equal(x.keys[..., :upto, :], y.keys[..., :upto, :]).item(), i
        assert mx.array_equal(x.values[..., :upto, :], y.values[..., :upto, :]).item(), i


def ids(n: int, seed: int = 0) -> mx.array:
    rng = random.Random(seed)
    return mx.array([rng.randrange(3, 490) for _ in range(n)], dtype=mx.int32)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("context,k", [(1, 1), (5, 3), (250, 10), (300, 16)])
def test_exact_verify_equals_decode_steps(tied, context, k):
    """Logits and every layer's K/V, bit for bit; (250, 10) crosses the 256-row buffer step."""
    target = Target(build_model(target_config(tied=tied)))
    target.use_exact(PER_ROW)
    x = ids(context + k)
    want, want_cache = decode_steps(target, x[:context], x[context:])
    got, cache = verify(target, x[:context], x[context:])
    assert mx.array_equal(got, want).item()
    assert_same_kv(cache, want_cache, context + k)


def mlx_lm_decode(target: Target, prompt: mx.array, rows: mx.array) -> mx.array:
    """Logits of K steps of mlx-lm's own decoding (its caches, its prefill chunks)."""
    cache = make_prompt_cache(target.model)
    start = 0
    for end in ExactVerify.prefill_ends(prompt.shape[0]):
        target.model(prompt[None, start:end], cache=cache)
        start = end
    steps = [target.model(rows[None, i : i + 1], cache=cache)[0] for i in range(rows.shape[0])]
    return mx.concatenate(steps)


@pytest.mark.parametrize(
    "name", ["gemma4:text_12b_like", "gemma4:wrapper_kv_shared", "nemotron_h", "qwen3_5"]
)
@pytest.mark.parametrize("plan", [CPU_PLAN, PER_ROW], ids=["cpu-plan", "per-row"])
def test_exact_verify_on_sliding_windows_and_hybrids(name, plan):
    """Past a sliding window (8 tokens here) plain decoding reads a ring buffer, and the exact
    verify reads it too (the normal one keeps the whole context: not bit-exact there, even on
    the CPU); recurrent layers step as decoding does."""
    family, _, shape = name.partition(":")
    if family == "gemma4":
        config = GEMMA4_TARGETS[shape]()
        model = build_model(config)
    else:
        config = HYBRID_TARGETS[name]()
        model = build_hybrid(config)
    target = Target(model, config)
    target.use_exact(plan)
    x = ids(20 + 6)
    want = mlx_lm_decode(target, x[:20], x[20:])
    cache = target.make_cache()
    target.prefill(x[:20], cache)
    got, _ = target(x[20:], cache)
    assert mx.array_equal(got, want).item()
    Target.rollback(cache, 4)  # a ring replays its committed rows
    got, _ = target(x[22:26], cache)
    assert mx.array_equal(got, want[2:]).item()


def test_exact_verify_is_exact_through_a_row_variant_matmul():
    """The normal verify shows the row-variant matmul; the exact one never computes a row with
    company, so it stays the decode step's, logits and K/V."""
    model = row_variant(build_model(target_config(tied=False)))
    normal, exact = Target(model), Target(model)
    exact.use_exact(PER_ROW)
    x = ids(40 + 6)
    want, want_cache = decode_steps(exact, x[:40], x[40:])
    got, cache = verify(exact, x[:40], x[40:])
    assert mx.array_equal(got, want).item()
    assert_same_kv(cache, want_cache, 46)
    assert not mx.array_equal(verify(normal, x[:40], x[40:])[0], want).item()


def test_wider_chunks_on_a_quantized_target():
    """Chunks of up to 3 rows (a plan for a backend whose qmv is row-invariant below a switch)
    on a 4-bit target: still the decode step's rows on the CPU, where every width is."""
    model = build_model(target_config(tied=True))
    nn.quantize(model, group_size=32, bits=4)
    target = Target(model)
    target.use_exact(RowPlan(matmul=3, quantized=3))
    assert type(target.layers[0].mlp.gate_proj).__name__ == "RowsQuantizedLinear"
    x = ids(20 + 7)
    want, want_cache = decode_steps(target, x[:20], x[20:])
    got, cache = verify(target, x[:20], x[20:])
    assert mx.array_equal(got, want).item()
    assert_same_kv(cache, want_cache, 27)


def test_exact_cache_keeps_the_decode_steps_buffer_sizes():
    """Rows are written in segments that end where plain decoding grows its buffer (256 rows),
    each row sees its own prefix, and after a rollback the buffer is cut back."""
    target = Target(build_model(target_config()))
    target.use_exact(PER_ROW)
    cache = target.make_cache()
    assert all(type(c) is ExactKVCache for c in cache)
    x = ids(270)
    target.prefill(x[:250], cache)
    assert cache[0].capacity == 256
    target(x[250:260], cache)
    assert cache[0].capacity == 512 and cache[0].offset == 260
    Target.rollback(cache, 8)  # keep 252 positions: plain decoding would hold 256 rows
    target(x[252:254], cache)
    assert cache[0].capacity == 256 and cache[0].offset == 254
    want, want_cache = decode_steps(target, x[:250], x[250:254])
    assert_same_kv(cache, want_cache, 254)


def test_prefill_ends_are_mlx_lms():
    """mlx-lm's generate_step: 2048-token chunks of all but the last token, then that one."""
    assert ExactVerify.prefill_ends(1) == [1]
    assert ExactVerify.prefill_ends(2) == [1, 2]
    assert ExactVerify.prefill_ends(2049) == [2048, 2049]
    assert ExactVerify.prefill_ends(5000) == [2048, 4096, 4999, 5000]


def test_decode_scores_are_mlx_lms_log_probabilities():
    logits = mx.random.normal((4, 50)).astype(mx.bfloat16) * 8
    scores = decode_scores(logits)
    for i in range(4):
        row = logits[i : i + 1]
        assert mx.array_equal(scores[i : i + 1], row - mx.logsumexp(row, keepdims=True)).item()


def test_split_rows_calls_in_chunks():
    seen = []

    def call(x):
        seen.append(x.shape[1])
        return x * 2

    x = mx.arange(2 * 7 * 3).reshape(2, 7, 3)
    assert mx.array_equal(split_rows(call, x, 3), x * 2).item()
    assert seen == [3, 3, 1]


def test_cpu_plan_keeps_matmuls_whole():
    """On the CPU backend matmuls are row-invariant: its plan splits attention only."""
    target = Target(build_model(target_config()))
    target.use_exact()
    assert target.exact is not None and target.exact.plan == CPU_PLAN
    assert "matmuls all rows in one call" in target.exact.describe()
    calls = []
    split_rows(lambda x: calls.append(x.shape[1]) or x, ids(8)[None, :, None], None)
    assert calls == [8]


def test_exact_speculation_is_mlx_lms_through_a_row_variant_matmul():
    """Speculative greedy decoding with the exact verify gives mlx-lm's own tokens even when
    the target's matmuls are row-variant; the normal verify does not (the injection bites)."""
    config = target_config(tied=False)
    model = row_variant(build_model(config, seed=4))
    drafter = build_drafter(dspark_config(config), seed=5)
    exact, normal = Target(model), Target(model)
    exact.use_exact(PER_ROW)
    exact.set_taps(drafter.tap_ids)
    normal.set_taps(drafter.tap_ids)
    prompt = ids(30, seed=6).tolist()
    want = greedy_reference(model, prompt, 24, eos=set())
    assert run(exact, drafter, prompt, 24, max_draft=4)[0] == want
    assert run(normal, drafter, prompt, 24, max_draft=4)[0] != want
