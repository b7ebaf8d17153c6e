"""Conformance with outputs of the reference implementations (DeepSpec DSpark and DeepSpec
DFlash on tiny Qwen3 targets): tokens, per-round proposals and acceptance, drafter logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import FIXTURES, check_fixture_case, load_reference

from mlx_specdec import load_pair
from mlx_specdec.drafters.dspark import build
from mlx_specdec.sampling import SamplingParams, probs

NAMES = ["dspark_qwen3", "dflash_deepspec_qwen3"]
# Rounds the trace check compares per case, at least (the reference's leading trace-robust ones).
MIN_ROUNDS = {
    "dspark_qwen3": {"raw_prefix": 7, "chat_a": 7, "raw_prefix_b": 6, "chat_eos_stop": 4},
    "dflash_deepspec_qwen3": {"raw_prefix": 6, "chat_a": 1, "raw_prefix_b": 1, "chat_eos_stop": 4},
}


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    root = FIXTURES / request.param
    ref, tensors = load_reference(root)
    pair = load_pair(str(root / "target"), str(root / "drafter"), drafter_bits=16)
    return root, ref, tensors, pair


def test_tokens_and_robust_rounds(fixture):
    root, ref, _, (target, _, drafter, _) = fixture
    assert [case["name"] for case in ref["cases"]] == list(MIN_ROUNDS[root.name])
    for case in ref["cases"]:
        check_fixture_case(target, drafter, ref, case, MIN_ROUNDS[root.name][case["name"]])


def _drafter(root, dtype):
    """The drafter alone (no tensors shared with the target), in `dtype`."""
    config = json.loads((root / "drafter" / "config.json").read_text())
    model = build(config, "fixture drafter")
    model.load_weights(list(mx.load(str(root / "drafter" / "model.safetensors")).items()))
    model.set_dtype(dtype)
    return model


def _round0_logits(model, case, tensors, markov_prev):
    """Markov-corrected block logits and hidden states, fed the recorded round-0 inputs."""
    name, r0 = case["name"], case["spec_greedy"]["rounds"][0]
    ctx = tensors[f"{name}.round0.ctx_features"]
    cfg = model.config
    block = mx.array([r0["anchor"]] + [cfg.mask_token_id] * (cfg.block_size - 1))
    h = model.backbone(block, ctx.astype(model.fc.weight.dtype), model.new_state())
    logits = model.lm_head(h).astype(mx.float32)
    if cfg.markov_rank:
        w1, w2 = model.markov_head.markov_w1, model.markov_head.markov_w2
        logits = logits + w2(w1(mx.array(markov_prev))).astype(mx.float32)
    return logits, h


def test_drafter_logits_within_tolerance(fixture):
    root, ref, tensors, _ = fixture
    fp32, bf16 = _drafter(root, mx.float32), _drafter(root, mx.bfloat16)
    for case in ref["cases"]:
        name, tol = case["name"], case["tolerances"]
        prev = case["spec_greedy"]["rounds"][0].get("markov_prev_tokens")
        got32, h = _round0_logits(fp32, case, tensors, prev)
        want32 = tensors[f"{name}.round0.fp32_isolated.draft_logits"]
        assert mx.abs(got32 - want32).max().item() < 2e-3, name
        got16, _ = _round0_logits(bf16, case, tensors, prev)
        want16 = tensors[f"{name}.round0.draft_logits"].astype(mx.float32)
        limit = 2 * tol["round0_isolated_drafter_fp32_vs_bf16_maxabs"]
        assert mx.abs(got16 - want16).max().item() < limit, name
        if fp32.config.confidence_head:
            feats = mx.concatenate([h, fp32.markov_head.markov_w1(mx.array(prev))], axis=-1)
            conf = fp32.confidence_head.proj(feats)[:, 0]
            want = np.array(case["spec_greedy"]["rounds"][0]["confidence_logit"])
            limit = 2 * tol["round0_isolated_confidence_fp32_vs_bf16_maxabs"]
            assert np.abs(np.array(conf) - want).max() < limit, name


def test_temperature_one_draft_distributions(fixture):
    """q at T=1: our transform of the reference's logits is the reference's q, and our own
    logits (hence q) agree within the bf16 noise the fixture documents."""
    root, ref, tensors, _ = fixture
    model = _drafter(root, mx.float32)
    for case in ref["cases"]:
        name, prev = case["name"], case["temperature_1"].get("markov_prev_tokens")
        want = tensors[f"{name}.t1.round0.q"]
        theirs = tensors[f"{name}.t1.round0.draft_logits"]
        q = probs(theirs, SamplingParams(temperature=1.0))
        assert mx.abs(q - want).max().item() < 1e-5, name
        ours, _ = _round0_logits(model, case, tensors, prev)
        limit = 2 * case["tolerances"]["round0_isolated_drafter_fp32_vs_bf16_maxabs"]
        assert mx.abs(ours - theirs.astype(mx.float32)).max().item() < limit, name
