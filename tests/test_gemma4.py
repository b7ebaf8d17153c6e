"""Gemma-4: text and multimodal-wrapper targets (sliding windows, KV sharing, per-layer inputs)
stay lossless, and the DSpark Gemma4 drafter reproduces the `dspark_gemma4` fixture."""

from __future__ import annotations

import json
import math
import random

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    FIXTURES,
    GEMMA4_MASK_ID,
    GEMMA4_TARGETS,
    GEMMA4_WINDOW,
    check_fixture_case,
    dspark_config,
    gemma4_text_config,
    greedy_reference,
    load_reference,
    run,
    write_drafter,
    write_target,
)

from mlx_specdec import SpecDecError, load_pair
from mlx_specdec.drafters.base import Proposal
from mlx_specdec.drafters.dspark import build
from mlx_specdec.drafters.layers import AttentionShape, make_rope
from mlx_specdec.loading import load_target
from mlx_specdec.sampling import SamplingParams, probs

FIXTURE = FIXTURES / "dspark_gemma4"
REFERENCE, TENSORS = load_reference(FIXTURE)
CASES = {case["name"]: case for case in REFERENCE["cases"]}
MASK_ID = GEMMA4_MASK_ID
WINDOW = GEMMA4_WINDOW
# Rounds the trace check compares per case, at least (the reference's leading trace-robust ones).
MIN_ROUNDS = {"raw_prefix": 7, "chat_a": 0, "raw_prefix_b": 7, "chat_eos_stop": 0}
NO_ROUNDS = {
    "chat_a": "the reference's round 0 is not trace-robust (target or draft margins within bf16 "
    "noise), so no round is: its tokens are checked",
    "chat_eos_stop": "the reference's round 0 is not trace-robust (target or draft margins "
    "within bf16 noise), so no round is: its tokens and where its stop token ends it are checked",
}


@pytest.fixture(scope="module")
def fixture_pair():
    return load_pair(str(FIXTURE / "target"), str(FIXTURE / "drafter"), drafter_bits=16)


@pytest.fixture(scope="module")
def fp32_drafter():
    """The fixture drafter alone in float32 (no tensors shared with a bf16 target)."""
    model = build(json.loads((FIXTURE / "drafter" / "config.json").read_text()), "drafter")
    model.load_weights(list(mx.load(str(FIXTURE / "drafter" / "model.safetensors")).items()))
    model.set_dtype(mx.float32)
    return model


def f32(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


# ----------------------------------------------------------------------------- RoPE
def test_proportional_rope_matches_the_direct_formula():
    d, theta, factor, offset = 512, 1e6, 0.25, 1000
    shape = AttentionShape(
        64, 1, 1, d, 1e-6, theta, rope_type="proportional", partial_rotary_factor=factor
    )
    x = mx.random.normal((1, 1, 5, d), key=mx.random.key(0))
    got = np.array(make_rope(shape)(x, offset=offset))[0, 0]

    # Pair k rotates dims (k, k + d/2) by angle pos * theta^(-2k/d), for k < factor*d/2 only.
    half, angles = d // 2, int(factor * d // 2)
    inv = np.where(np.arange(half) < angles, theta ** (-2 * np.arange(half) / d), 0.0)
    pos = np.arange(offset, offset + 5)[:, None] * inv[None]
    cos, sin = np.cos(pos), np.sin(pos)
    a, b = np.array(x)[0, 0, :, :half], np.array(x)[0, 0, :, half:]
    want = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    np.testing.assert_allclose(got, want, atol=5e-4)  # fp32 angles at position ~1000
    # Only dims 0..63 and 256..319 move.
    np.testing.assert_array_equal(got[:, angles:half], np.array(x)[0, 0, :, angles:half])
    assert not np.allclose(got[:, :angles], np.array(x)[0, 0, :, :angles])


# ----------------------------------------------------------------------------- fixture
@pytest.mark.parametrize("name", list(CASES))
def test_fixture_tokens_and_rounds(fixture_pair, name):
    target, _, drafter, config = fixture_pair
    assert config.drafter_kind == "dspark" and config.shared_with_target == [
        "embed_tokens",
        "lm_head",
    ]
    # Every draft of a robust round is compared, past the first rejection too.
    check_fixture_case(
        target,
        drafter,
        REFERENCE,
        CASES[name],
        MIN_ROUNDS[name],
        whole_proposals=True,
        none_because=NO_ROUNDS.get(name, ""),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_fixture_taps_and_bf16_draft_logits(fixture_pair, name):
    target, _, drafter, _ = fixture_pair
    case, ref = CASES[name], CASES[name]["spec_greedy"]["rounds"]
    _, taps = target.prefill(mx.array(case["prompt_ids"]), target.make_cache())
    want = f32(TENSORS[f"{name}.round0.ctx_features"])
    assert np.abs(f32(taps) - want).max() < 0.03 * np.abs(want).max()  # bf16 noise

    # Draft rounds 0-2 fed the recorded target taps: corrected logits within ~2x the bf16 noise.
    tolerance = 2 * case["tolerances"]["round0_isolated_drafter_fp32_vs_bf16_maxabs"] + 0.1
    state = drafter.new_state()
    for i in range(3):
        key = f"{name}.round{i}.draft_logits"
        if key not in TENSORS:
            break
        block = mx.array([ref[i]["anchor"]] + [MASK_ID] * 6, dtype=mx.int32)
        h = drafter.backbone(block, TENSORS[f"{name}.round{i}.ctx_features"], state)
        w1, w2 = drafter.markov_head.markov_w1, drafter.markov_head.markov_w2
        z = drafter._head(h) + w2(w1(mx.array(ref[i]["markov_prev_tokens"])))
        assert np.abs(f32(z) - f32(TENSORS[key])).max() < tolerance, i
        assert state[0].offset == ref[i]["start"]  # the cache holds exactly the context rows


@pytest.mark.parametrize("name", list(CASES))
def test_fixture_fp32_drafter_isolated(fp32_drafter, name):
    r0 = CASES[name]["spec_greedy"]["rounds"][0]
    block = mx.array([r0["anchor"]] + [MASK_ID] * 6, dtype=mx.int32)
    ctx = TENSORS[f"{name}.round0.ctx_features"].astype(mx.float32)
    h = fp32_drafter.backbone(block, ctx, fp32_drafter.new_state())
    w1 = fp32_drafter.markov_head.markov_w1(mx.array(r0["markov_prev_tokens"]))
    z = fp32_drafter._head(h) + fp32_drafter.markov_head.markov_w2(w1)
    want = f32(TENSORS[f"{name}.round0.fp32_isolated.draft_logits"])
    np.testing.assert_allclose(f32(z), want, atol=1e-3)
    conf = fp32_drafter.confidence_head.proj(mx.concatenate([h, w1], axis=-1))[:, 0]
    tolerance = CASES[name]["tolerances"]["round0_isolated_confidence_fp32_vs_bf16_maxabs"]
    assert np.abs(f32(conf) - np.array(r0["confidence_logit"])).max() <= tolerance + 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_fixture_temperature_one_distributions(fp32_drafter, name):
    t1 = CASES[name]["temperature_1"]
    prev = t1["markov_prev_tokens"]  # the anchor, then the sampled drafts
    block = mx.array([prev[0]] + [MASK_ID] * 6, dtype=mx.int32)
    ctx = TENSORS[f"{name}.round0.ctx_features"].astype(mx.float32)
    h = fp32_drafter.backbone(block, ctx, fp32_drafter.new_state())
    z = fp32_drafter._head(h) + fp32_drafter.markov_head.markov_w2(
        fp32_drafter.markov_head.markov_w1(mx.array(prev))
    )
    # Our logits are the reference's up to bf16 noise, and our q of the reference's own logits
    # is the q it sampled from.
    ref_logits = TENSORS[f"{name}.t1.round0.draft_logits"]
    tolerance = 2 * CASES[name]["tolerances"]["round0_isolated_drafter_fp32_vs_bf16_maxabs"] + 0.1
    assert np.abs(f32(z) - f32(ref_logits)).max() < tolerance
    q = f32(probs(ref_logits.astype(mx.float32), SamplingParams(temperature=1.0)))
    np.testing.assert_allclose(q, f32(TENSORS[f"{name}.t1.round0.q"]), atol=1e-4)


# ----------------------------------------------------------------------------- tiny targets
@pytest.mark.parametrize("kind", list(GEMMA4_TARGETS))
def test_tiny_gemma4_targets_match_mlx_lm_greedy(tmp_path, kind):
    config = GEMMA4_TARGETS[kind]()
    text = config.get("text_config", config)
    seed = list(GEMMA4_TARGETS).index(kind)
    target_dir = write_target(tmp_path / "t", config, seed=seed)
    drafter_dir = write_drafter(tmp_path / "d", dspark_config(text), seed=seed + 10)
    target, _, drafter, _ = load_pair(str(target_dir), str(drafter_dir), drafter_bits=16)
    cache = target.make_cache()
    assert len(cache) == target.num_layers - text["num_kv_shared_layers"]
    rng = random.Random(seed)
    for length in (3, 3 * WINDOW + 5, 70):  # mostly longer than the sliding window
        prompt = [rng.randrange(7, 490) for _ in range(length)]
        want = greedy_reference(target.model, prompt, 2 * WINDOW + 4, eos=set())
        for cap in (2, 7):
            assert run(target, drafter, prompt, 2 * WINDOW + 4, max_draft=cap)[0] == want, cap


def test_tiny_gemma4_with_a_good_drafter_rolls_back_sliding_layers(tmp_path):
    """A drafter that always proposes the target's own continuation, forced wrong at one slot,
    makes every round reject and trim the sliding layers' caches past the window."""
    config = gemma4_text_config()
    target_dir = write_target(tmp_path / "t", config, seed=7)
    target, _ = load_target(str(target_dir))
    prompt = list(range(20, 20 + 3 * WINDOW))
    want = greedy_reference(target.model, prompt, 40, eos=set())

    class Oracle:  # proposes want's continuation after the anchor, slot 2 corrupted
        kind, tap_ids, max_draft = "oracle", (0,), 7

        def new_state(self, padded: bool = False) -> dict:
            return {"anchor": None}

        def propose(self, state, context, next_tokens, n, params):
            # First call: the anchor is want[0]; later ones move on by the committed tokens.
            a = state["anchor"]
            state["anchor"] = a = 0 if a is None else a + next_tokens.shape[0]
            drafts = list(want[a + 1 : a + 1 + n]) + [0] * n
            drafts = drafts[:n]
            if n > 2:
                drafts[2] = (drafts[2] + 1) % 500
            return Proposal(mx.array(drafts, dtype=mx.int32))

    target.set_taps(Oracle.tap_ids)
    got, rounds = run(target, Oracle(), prompt, 40)
    assert got == want
    assert sum(r.accepted for r in rounds) > 20 and any(
        r.accepted < len(r.proposed) for r in rounds
    )


def test_taps_include_the_layer_scalar(tmp_path):
    target, _ = load_target(str(write_target(tmp_path / "t", gemma4_text_config(), seed=3)))
    target.set_taps([0, 1])
    ids = mx.array([5, 9, 11, 200])
    _, before = target(ids, target.make_cache())
    target.layers[0].layer_scalar = mx.array([2.0])
    _, after = target(ids, target.make_cache())
    np.testing.assert_allclose(f32(after[:, :64]), 2 * f32(before[:, :64]), rtol=1e-5)


def test_unsupported_gemma4_drafters_are_refused():
    base = dspark_config(gemma4_text_config())
    for bad, words in (
        (dict(enable_moe_block=True), "MoE"),
        (dict(hidden_size_per_layer_input=8), "per-layer inputs"),
        (dict(num_kv_shared_layers=1), "KV-shared"),
        (dict(hidden_activation="silu"), "activation 'silu'"),
    ):
        with pytest.raises(SpecDecError, match=words):
            build({**base, **bad}, "drafter")


def test_gemma4_drafter_shape_is_global_k_eq_v():
    model = build(dspark_config(gemma4_text_config()), "drafter")
    attn = model.layers[0].self_attn
    assert "v_proj" not in attn and attn.k_proj.weight.shape == (32, 64)  # 1 KV head x 32
    assert attn.scale == 1.0 and attn.q_proj.weight.shape == (4 * 32, 64)
    assert model._embed_scale == 8.0 == math.sqrt(64)
    big = build(
        dspark_config(
            gemma4_text_config(
                hidden_size=3840,
                intermediate_size=8,
                num_attention_heads=1,
                vocab_size=8,
                global_head_dim=8,
            )
        ),
        "drafter",
    )
    assert big._embed_scale == 62.0  # sqrt(3840) = 61.97 rounded through bf16
