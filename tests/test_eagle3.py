"""DeepSpec EAGLE3 drafter: conformance with the `eagle3_qwen3` fixture (reference trace, draft
cache bookkeeping, tensors), lossless greedy decoding against plain mlx-lm, and clear refusals of
bad checkpoints."""

from __future__ import annotations

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
from mlx_specdec.sampling import SamplingParams

FIXTURE = FIXTURES / "eagle3_qwen3"
REFERENCE, TENSORS = load_reference(FIXTURE)
CASES = REFERENCE["cases"]
# Rounds the trace check compares per case, at least (the reference's leading trace-robust ones).
MIN_ROUNDS = {"raw_prefix": 7, "chat_a": 1, "raw_prefix_b": 8, "chat_eos_stop": 0}
NO_ROUNDS = {
    "chat_eos_stop": "the reference marks none of its rounds trace-robust (target or draft "
    "margins within bf16 noise): its tokens and where its stop token ends it are checked"
}


@pytest.fixture(scope="module")
def pair():
    target, _, drafter, config = load_pair(
        str(FIXTURE / "target"), str(FIXTURE / "drafter"), mode="eagle3", drafter_bits=16
    )
    assert config.drafter_kind == "eagle3" and drafter.max_draft == 7
    # The checkpoint's embedding and head are frozen copies of the (untied) target's.
    assert config.shared_with_target == ["embed_tokens", "lm_head"]
    return target, drafter


def chain_logits(drafter, state, features, tokens, chain) -> mx.array:
    """Extend the draft cache with (features, tokens), then feed `chain` (the drafts after the
    first) one by one; the logits of every step. The chain rows are dropped again, as `propose`
    drops them."""
    cache = state[0]
    h = drafter.extend(cache, features, mx.array(tokens, dtype=mx.int32))
    committed = cache.offset
    rows = [drafter.logits(h)]
    for token in chain:
        h = drafter.step(cache, mx.array([token], dtype=mx.int32), h)
        rows.append(drafter.logits(h))
    cache.trim(cache.offset - committed)
    return mx.concatenate(rows)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_output_and_trace(pair, case):
    target, drafter = pair
    name = case["name"]
    check_fixture_case(
        target, drafter, REFERENCE, case, MIN_ROUNDS[name], none_because=NO_ROUNDS.get(name, "")
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_draft_cache_is_cropped_and_re_extended_like_the_reference(pair, case):
    """Replaying the reference's extend calls (recorded taps and tokens) with the reference's
    drafts in between: before each extend the cache holds exactly the committed rows the
    reference had, and the chain logits of rounds 0-2 match the reference tensors."""
    _, drafter = pair
    name, state = case["name"], drafter.new_state()
    spec = case["spec_greedy"]
    tolerance = 2 * case["tolerances"]["round0_draft_logits_bf16_vs_fp32_maxabs"]
    first_tolerance = 2 * case["tolerances"]["round0_isolated_drafter_fp32_vs_bf16_maxabs"]
    for i, call in enumerate(spec["draft_cache_extend_calls"][: len(spec["rounds"])]):
        proposed = spec["rounds"][i]["proposed_tokens"]
        features = TENSORS[f"{name}.extend{i}.features"]
        assert state[0].offset == call["cache_len_before"]
        got = chain_logits(drafter, state, features, call["input_ids"], proposed[:-1])
        assert state[0].offset == call["cache_len_before"] + len(call["input_ids"])
        assert call["position_ids"][-1] == state[0].offset - 1
        if f"{name}.round{i}.draft_logits" in TENSORS:
            want = TENSORS[f"{name}.round{i}.draft_logits"]
            assert max_diff(got, want) < tolerance, (name, i)
            if i == 0:
                assert max_diff(got[:1], want[:1]) < first_tolerance


def test_fp32_drafter_logits_match_fp32_reference():
    _, _, drafter, _ = load_pair(
        str(FIXTURE / "target"), str(FIXTURE / "drafter"), mode="eagle3", drafter_bits=32
    )
    for case in CASES:
        name = case["name"]
        call = case["spec_greedy"]["draft_cache_extend_calls"][0]
        features = TENSORS[f"{name}.extend0.features"].astype(mx.float32)
        got = chain_logits(drafter, drafter.new_state(), features, call["input_ids"], [])
        assert max_diff(got, TENSORS[f"{name}.round0.fp32_isolated.draft_logits"]) < 1e-3


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_temperature_one_distributions(pair, case):
    """At temperature 1 the chain is fed the reference's sampled drafts; q rows match."""
    _, drafter = pair
    t1, name = case["temperature_1"], case["name"]
    params = SamplingParams(
        temperature=t1["temperature"], top_p=t1.get("top_p") or 1.0, top_k=t1.get("top_k") or 0
    )
    call = case["spec_greedy"]["draft_cache_extend_calls"][0]
    want = TENSORS[f"{name}.t1.round0.q"]
    chain = t1["sampled_draft_tokens"][: want.shape[0] - 1]
    logits = chain_logits(
        drafter, drafter.new_state(), TENSORS[f"{name}.extend0.features"], call["input_ids"], chain
    )
    reference = {"logits": TENSORS[f"{name}.t1.round0.draft_logits"], "q": want}
    tolerance = 2 * case["tolerances"]["round0_draft_logits_bf16_vs_fp32_maxabs"]
    check_distributions(logits, reference, params, tolerance)


def test_sampled_proposals_carry_their_distributions(pair):
    target, drafter = pair
    params = SamplingParams(temperature=0.8, top_k=50, seed=3)
    prompt = CASES[0]["prompt_ids"]
    _, taps = target.prefill(mx.array(prompt), target.make_cache())
    next_tokens = mx.array(prompt[1:] + [305], dtype=mx.int32)
    proposal = drafter.propose(drafter.new_state(), taps, next_tokens, 5, params)
    assert proposal.tokens.shape == (5,) and proposal.q.shape == (5, target.vocab_size)
    picked = proposal.q[mx.arange(5), proposal.tokens]
    assert mx.all(picked > 0).item()  # every draft was drawn from its own row


def test_matches_mlx_lm_greedy_for_every_cap(pair):
    """Every cap on fixture prompts (long accepted runs) and on random prompts of several
    lengths (mostly rejections)."""
    target, drafter = pair
    rng = random.Random(1)
    runs = [(CASES[i]["prompt_ids"], (None, *range(1, 8))) for i in (0, 3)]
    runs += [([rng.randrange(3, 490) for _ in range(n)], (None, 2)) for n in (1, 9, 70)]
    for prompt, caps in runs:
        want = greedy_reference(target.model, prompt, 24, eos=set())
        for cap in caps:
            got, rounds = run(target, drafter, prompt, 24, max_draft=cap)
            assert got == want, (len(prompt), cap)
            assert all(len(r.proposed) <= (cap or 7) for r in rounds)


# ------------------------------------------------------------------ bad checkpoints
def _hidden(c):
    c["hidden_size"] = 32


def _two_layers(c):
    c["num_hidden_layers"] = 2


def _no_taps(c):
    del c["target_layer_ids"]


def _tap_last_layer(c):
    c["target_layer_ids"] = [1, 2, 3, 4, 6]


@pytest.mark.parametrize(
    "change,drop,message",
    [
        (None, "layers.0.hidden_norm.weight", "missing tensors layers.0.hidden_norm.weight"),
        (_hidden, None, "has shape .* the config implies"),
        (_two_layers, None, "EAGLE3 drafters with 2 layers are not supported"),
        (_no_taps, None, "lacks target_layer_ids"),
        (_tap_last_layer, None, "taps target layer 6"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, change, drop, message):
    drafter = broken_drafter(FIXTURE, tmp_path, change, drop)
    with pytest.raises(SpecDecError, match=message):
        load_pair(str(FIXTURE / "target"), drafter, mode="eagle3", drafter_bits=16)


def test_wrong_mode_is_refused():
    with pytest.raises(SpecDecError, match="--mode dflash needs a dflash drafter"):
        load_pair(str(FIXTURE / "target"), str(FIXTURE / "drafter"), mode="dflash")
