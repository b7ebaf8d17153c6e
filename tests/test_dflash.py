"""z-lab DFlash drafter: conformance with the `zlab_dflash_qwen3` fixture (reference trace and
tensors), lossless greedy decoding against plain mlx-lm, the block/cap/mask semantics, and clear
refusals of bad checkpoints."""

from __future__ import annotations

import copy
import json
import random

import mlx.core as mx
import pytest
from helpers import (
    FIXTURES,
    broken_drafter,
    check_distributions,
    check_fixture_case,
    greedy_reference,
    load_reference,
    max_diff,
    run,
)

from mlx_specdec import SpecDecError, load_pair
from mlx_specdec.drafters import dflash
from mlx_specdec.sampling import SamplingParams

FIXTURE = FIXTURES / "zlab_dflash_qwen3"
REFERENCE, TENSORS = load_reference(FIXTURE)
CASES = REFERENCE["cases"]
DRAFTER_CONFIG = json.loads((FIXTURE / "drafter" / "config.json").read_text())
MASK = DRAFTER_CONFIG["dflash_config"]["mask_token_id"]
# Rounds the trace check compares per case, at least (the reference's leading trace-robust ones).
MIN_ROUNDS = {"raw_prefix": 3, "chat_a": 4, "raw_prefix_b": 4, "chat_eos_stop": 2}


@pytest.fixture(scope="module")
def pair():
    target, _, drafter, config = load_pair(
        str(FIXTURE / "target"), str(FIXTURE / "drafter"), mode="dflash", drafter_bits=16
    )
    assert config.drafter_kind == "dflash" and drafter.max_draft == 15
    assert config.shared_with_target == ["embed_tokens", "lm_head"]
    return target, drafter


def block(anchor: int, size: int = 16) -> mx.array:
    return mx.array([anchor] + [MASK] * (size - 1), dtype=mx.int32)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_output_and_trace(pair, case):
    target, drafter = pair
    check_fixture_case(target, drafter, REFERENCE, case, MIN_ROUNDS[case["name"]])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_drafter_logits_match_reference_tensors(pair, case):
    """Fed the recorded context of rounds 0-2 in turn (the draft cache accumulates it), our bf16
    logits stay within twice the reference's own bf16-vs-fp32 noise."""
    _, drafter = pair
    name, state = case["name"], drafter.new_state()
    tolerance = 2 * case["tolerances"]["round0_isolated_drafter_fp32_vs_bf16_maxabs"]
    for i, rnd in enumerate(case["spec_greedy"]["rounds"][:3]):
        want = TENSORS[f"{name}.round{i}.draft_logits"]
        got = drafter.logits(
            block(rnd["anchor"]), TENSORS[f"{name}.round{i}.ctx_features"], state, want.shape[0]
        )
        assert state[0].offset == rnd["draft_cache_len_before"] + rnd["new_context_rows"]
        assert max_diff(got, want) < tolerance, (name, i)


def test_fp32_drafter_logits_match_fp32_reference():
    target, _, drafter, _ = load_pair(
        str(FIXTURE / "target"), str(FIXTURE / "drafter"), mode="dflash", drafter_bits=32
    )
    for shared in (target.embed_tokens, target.head_module):  # fp32, as the reference ran them
        shared.set_dtype(mx.float32)
    for case in CASES:
        name, anchor = case["name"], case["spec_greedy"]["rounds"][0]["anchor"]
        ctx = TENSORS[f"{name}.round0.ctx_features"].astype(mx.float32)
        got = drafter.logits(block(anchor), ctx, drafter.new_state(), 15)
        assert max_diff(got, TENSORS[f"{name}.round0.fp32_isolated.draft_logits"]) < 1e-3


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_temperature_one_distributions(pair, case):
    _, drafter = pair
    t1 = case["temperature_1"]
    params = SamplingParams(
        temperature=t1["temperature"], top_p=t1.get("top_p") or 1.0, top_k=t1.get("top_k") or 0
    )
    name, anchor = case["name"], case["spec_greedy"]["rounds"][0]["anchor"]
    want = TENSORS[f"{name}.t1.round0.q"]
    logits = drafter.logits(
        block(anchor), TENSORS[f"{name}.round0.ctx_features"], drafter.new_state(), want.shape[0]
    )
    reference = {"logits": TENSORS[f"{name}.t1.round0.draft_logits"], "q": want}
    tolerance = 2 * case["tolerances"]["round0_isolated_drafter_fp32_vs_bf16_maxabs"]
    check_distributions(logits, reference, params, tolerance)


@pytest.mark.slow
def test_matches_mlx_lm_greedy_for_every_cap(pair):
    """Every cap on fixture prompts (high acceptance, so long runs of accepted drafts), and a few
    caps on random prompts of several lengths (near-zero acceptance: rejection paths)."""
    target, drafter = pair
    rng = random.Random(0)
    runs = [(CASES[i]["prompt_ids"], (None, *range(1, 16))) for i in (1, 2)]
    runs += [([rng.randrange(3, 490) for _ in range(n)], (None, 2)) for n in (1, 9, 70)]
    for prompt, caps in runs:
        want = greedy_reference(target.model, prompt, 32, eos=set())
        for cap in caps:
            got, rounds = run(target, drafter, prompt, 32, max_draft=cap)
            assert got == want, (len(prompt), cap)
            assert all(len(r.proposed) <= (cap or 15) for r in rounds)


def test_cap_verifies_the_first_drafts_of_the_full_block(pair):
    """Cap semantics (spec §3.7 B): a capped round drafts the full block and verifies its first
    N drafts, so its proposals are a prefix of the uncapped round's."""
    target, drafter = pair
    prompt = CASES[0]["prompt_ids"]
    full = run(target, drafter, prompt, 20)[1][0].proposed
    for cap in (1, 4, 9):
        assert run(target, drafter, prompt, 20, max_draft=cap)[1][0].proposed == full[:cap]


# ------------------------------------------------------------------ config variants, in memory
def variant(target, base: dflash.DFlashDrafter | None = None, **changes) -> dflash.DFlashDrafter:
    """A drafter built from the fixture's config with `changes` (`dflash_config` entries merged),
    holding `base`'s weights (random ones without a base), bound to the fixture's target."""
    config = copy.deepcopy(DRAFTER_CONFIG)
    config["dflash_config"].update(changes.pop("dflash_config", {}))
    config.update(changes)
    mx.random.seed(7)
    drafter = dflash.build(config, "test drafter")
    if base is not None:
        drafter.update(base.parameters())
    mx.eval(drafter.parameters())
    drafter.share_target_tensors(target)
    return drafter


def test_sliding_window_hides_context_beyond_the_window(pair):
    target, _ = pair
    d = variant(target, layer_types=["sliding_attention"] * 3, sliding_window=4)
    ctx = TENSORS["chat_a.round0.ctx_features"]  # 34 rows: the block starts at 34
    noise = mx.random.normal(ctx.shape).astype(ctx.dtype)
    base = d.logits(block(7), ctx, d.new_state(), 15)
    # Query at 34 sees keys 31..34; rows <= 30 are outside every query's window.
    old = mx.concatenate([noise[:31], ctx[31:]])
    assert max_diff(d.logits(block(7), old, d.new_state(), 15), base) == 0
    recent = mx.concatenate([ctx[:31], noise[31:]])
    assert max_diff(d.logits(block(7), recent, d.new_state(), 15), base) > 1e-2


@pytest.mark.parametrize("is_causal", [True, False])
def test_causal_flag_inside_the_block(pair, is_causal):
    """Causal in-block attention: a block row never sees later rows, so a shorter block gives the
    same leading rows. Bidirectional (the full-attention default): it does not."""
    target, _ = pair
    long = variant(target, is_causal=is_causal)
    short = variant(target, long, is_causal=is_causal, block_size=4)
    ctx = TENSORS["raw_prefix.round0.ctx_features"]
    a = long.logits(block(9), ctx, long.new_state(), 3)
    b = short.logits(block(9, 4), ctx, short.new_state(), 3)
    assert (max_diff(a, b) < 1e-6) == is_causal


def test_sliding_layers_stay_lossless(pair):
    target, _ = pair
    d = variant(
        target,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=6,
    )
    prompt = list(range(20, 60))  # longer than the window
    want = greedy_reference(target.model, prompt, 16, eos=set())
    for cap in (None, 3):
        assert run(target, d, prompt, 16, max_draft=cap)[0] == want


def test_output_multiplier_and_softcap(pair):
    target, _ = pair
    plain = variant(target)
    capped = variant(
        target, plain, dflash_config={"output_multiplier": 0.5, "final_logit_softcapping": 3.0}
    )
    ctx = TENSORS["raw_prefix.round0.ctx_features"]
    base = plain.logits(block(5), ctx, plain.new_state(), 15)
    got = capped.logits(block(5), ctx, capped.new_state(), 15)
    assert max_diff(got, 3.0 * mx.tanh(base.astype(mx.float32) * 0.5 / 3.0)) < 2e-2
    assert mx.abs(got).max().item() <= 3.0


def test_input_embedding_scale_multiplies_the_embedded_block():
    """On an untied target, scaling the embedding table by s is exactly `input_embedding_scale`
    s (the head is untouched)."""
    target, _, _, _ = load_pair(str(FIXTURES / "eagle3_qwen3" / "target"), None, mode="baseline")
    changes = dict(num_target_layers=target.num_layers)
    plain = variant(target, **changes)
    scaled = variant(target, plain, dflash_config={"input_embedding_scale": 2.0}, **changes)
    ctx = mx.random.normal((6, 4 * 64)).astype(mx.bfloat16)
    got = scaled.logits(block(5), ctx, scaled.new_state(), 15)
    embed = target.embed_tokens
    weight = embed.weight
    embed.weight = weight * 2
    try:
        want = plain.logits(block(5), ctx, plain.new_state(), 15)
    finally:
        embed.weight = weight
    assert max_diff(got, want) < 1e-3
    assert max_diff(got, plain.logits(block(5), ctx, plain.new_state(), 15)) > 1e-2


# ------------------------------------------------------------------ bad checkpoints
def _hidden(c):
    c["hidden_size"] = 32


def _dflash2(c):
    c["architectures"] = ["DFlash2DraftModel"]


def _unknown(c):
    c["architectures"] = ["MysteryDraftModel"]


def _no_mask(c):
    del c["dflash_config"]["mask_token_id"]


def _mask_outside(c):
    c["dflash_config"]["mask_token_id"] = 4096


def _sliding_no_window(c):
    c["layer_types"] = ["sliding_attention"] * 3


@pytest.mark.parametrize(
    "change,drop,message",
    [
        (None, "layers.1.self_attn.k_norm.weight", "missing tensors layers.1.self_attn.k_norm"),
        (_hidden, None, "has shape .* the config implies"),
        (_dflash2, None, "DFlash-2 checkpoints .* not supported"),
        (_unknown, None, "unknown drafter architecture 'MysteryDraftModel'"),
        (_no_mask, None, "lacks mask_token_id"),
        (_mask_outside, None, "mask_token_id 4096 is outside"),
        (_sliding_no_window, None, "need a positive sliding_window"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, change, drop, message):
    drafter = broken_drafter(FIXTURE, tmp_path, change, drop)
    with pytest.raises(SpecDecError, match=message):
        load_pair(str(FIXTURE / "target"), drafter, mode="dflash", drafter_bits=16)


def test_wrong_mode_is_refused():
    with pytest.raises(SpecDecError, match="--mode eagle3 needs a eagle3 drafter"):
        load_pair(str(FIXTURE / "target"), str(FIXTURE / "drafter"), mode="eagle3")
