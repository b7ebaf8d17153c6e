"""Honest reporting (divergence.py): where a greedy output leaves plain decoding's, and whether
the target was at a near-tie there (kernel rounding can flip it) or not (a bug). The tiny model
gets two tokens with identical output rows, so their logits tie exactly."""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
import pytest
from helpers import build_model, greedy_reference, target_config

from mlx_specdec.bench.report import verdict_line
from mlx_specdec.bench.run import Sample, explain_mismatches, lossless_verdict
from mlx_specdec.divergence import compare_line, find_divergence, first_difference, ulp_distance
from mlx_specdec.target import Target

PROMPT = [5, 17, 42, 99, 7]
TWIN = 511  # a padding row: made a copy of the pick's row, so its logit ties it exactly


@pytest.fixture(scope="module")
def tied_model():
    """An untied tiny Qwen3 whose output row TWIN equals the row of its 3rd greedy pick, and
    its greedy output (TWIN has the higher id, so mlx-lm's argmax still picks the original)."""
    model = build_model(target_config(tied=False), seed=3)
    pick = greedy_reference(model, PROMPT, 6, eos=set())[2]
    weight = model.lm_head.weight
    model.lm_head.weight = mx.concatenate([weight[:TWIN], weight[pick : pick + 1]])
    return model, greedy_reference(model, PROMPT, 6, eos=set())


def test_ulp_distance():
    assert ulp_distance(1.0, 1.0 + 2.0**-23, mx.float32) == 1
    assert ulp_distance(1.0, 1.0 + 2.0**-7, mx.bfloat16) == 1
    assert ulp_distance(1.0, 1.0 + 2.0**-10, mx.float16) == 1
    assert ulp_distance(-1.0, 1.0, mx.bfloat16) == 2 * 0x3F80  # through zero, both signs
    assert ulp_distance(0.0, -0.0, mx.float32) == 0
    a = mx.array([2.0, 4.0], dtype=mx.bfloat16)
    assert np.array_equal(ulp_distance(a, a * 1.0078125, mx.bfloat16), [1, 1])


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


def test_a_tie_is_a_near_tie(tied_model):
    model, ref = tied_model
    other = ref[:2] + [TWIN, 3]
    d = find_divergence(model, PROMPT, ref, other)
    assert (d.position, d.compared, d.margin_ulps, d.dtype) == (2, (ref[2], TWIN), 0, "float32")
    assert d.near_tie
    assert compare_line(model, PROMPT, ref, other) == (
        f"outputs DIFFERENT from token 2: a near-tie: the target's logits for tokens {ref[2]} "
        f"and {TWIN} are 0 float32 ulps apart, within the rounding of another kernel order"
    )


def test_a_wide_margin_is_a_real_mismatch(tied_model):
    model, ref = tied_model
    worst = int(mx.argmin(model(mx.array([PROMPT + ref[:2]]))[0, -1]).item())
    line = compare_line(model, PROMPT, ref, ref[:2] + [worst])
    assert line.startswith("outputs DIFFERENT from token 2: a real mismatch: the target prefers ")
    assert f"token {ref[2]} over {worst} by " in line and line.endswith(
        "far beyond kernel rounding: a bug"
    )


def test_an_early_stop_compares_the_top_two(tied_model):
    model, ref = tied_model
    d = find_divergence(model, PROMPT, ref, ref[:2])
    assert d.got is None and d.compared == (ref[2], TWIN) and d.near_tie
    assert "one output ended there" in d.describe()


def test_identical_outputs(tied_model):
    model, ref = tied_model
    assert compare_line(model, PROMPT, ref, list(ref)) == "outputs identical"


def test_generate_compare_wording(tied_model):
    """`generate --compare` analyses greedy outputs only (a sample differs by chance)."""
    from mlx_specdec.cli import _compare

    model, ref = tied_model

    class Run:
        def __init__(self, tokens):
            self.tokens = tokens

    target = Target(model)
    greedy, sampled = argparse.Namespace(temperature=0.0), argparse.Namespace(temperature=0.7)
    other = Run(ref[:2] + [TWIN])
    assert "a near-tie" in _compare(target, PROMPT, Run(ref), other, greedy)
    assert _compare(target, PROMPT, Run(ref), other, sampled) == "outputs DIFFERENT from token 2"


def sample(row: str, prompt: int, tokens: list[int]) -> Sample:
    return Sample(row, "code", prompt, 0, tokens, 1, len(tokens), [0], 1, 0.1, 0.1)


def test_bench_verdict_names_near_ties_and_real_mismatches(tied_model):
    model, ref = tied_model
    worst = int(mx.argmin(model(mx.array([PROMPT + ref[:2]]))[0, -1]).item())
    samples = [
        sample("baseline", 0, ref),
        sample("dspark@7", 0, ref[:2] + [TWIN]),
        sample("baseline", 1, ref),
        sample("dflash@7", 1, ref[:2] + [worst]),
    ]
    verdict = lossless_verdict(samples, "baseline", greedy=True)
    explain_mismatches(verdict, samples, Target(model), [PROMPT, PROMPT])
    assert verdict["near_ties"] == 1
    assert verdict["mismatches"][0]["divergence"]["near_tie"] is True
    line = verdict_line(verdict)
    assert line.startswith(
        "lossless: NO, 2 of 2 outputs differ from baseline: 1 at near-ties of the target's "
        "logits (kernel rounding: see --exact), 1 REAL MISMATCH (a bug); e.g. dflash@7 on "
        f"prompt 1 from token 2: a real mismatch, token {ref[2]} ahead of {worst} by "
    )


def test_bench_verdict_with_near_ties_only(tied_model):
    model, ref = tied_model
    samples = [sample("baseline", 0, ref), sample("dspark@7", 0, ref[:2] + [TWIN])]
    verdict = lossless_verdict(samples, "baseline", greedy=True)
    explain_mismatches(verdict, samples, Target(model), [PROMPT])
    assert verdict_line(verdict) == (
        "lossless: NO, 1 of 1 outputs differ from baseline: 1 at near-ties of the target's "
        "logits (kernel rounding: see --exact); e.g. dspark@7 on prompt 0 from token 2: a "
        f"near-tie, tokens {ref[2]} and {TWIN} 0 float32 ulps apart"
    )
