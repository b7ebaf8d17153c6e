"""Lossless greedy: the verify loop gives token-for-token what plain mlx-lm decoding gives."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from helpers import (
    FIXTURES,
    dspark_config,
    greedy_reference,
    run,
    target_config,
    write_drafter,
    write_target,
)
from mlx_lm.generate import generate_step

from mlx_specdec import SpecDecError, load_pair
from mlx_specdec.sampling import SamplingParams


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,tied,seed",
    [("qwen3", False, 0), ("qwen3", True, 1), ("llama", False, 2), ("llama", True, 3)],
)
def test_random_targets_match_mlx_lm_greedy(tmp_path, family, tied, seed):
    config = target_config(family, tied)
    target_dir = write_target(tmp_path / "t", config, seed=seed)
    drafter_dir = write_drafter(tmp_path / "d", dspark_config(config), seed=seed + 10)
    target, _, drafter, _ = load_pair(str(target_dir), str(drafter_dir), drafter_bits=16)
    rng = random.Random(seed)
    for length in (1, 2, 7, 33, 200):
        prompt = [rng.randrange(3, 490) for _ in range(length)]
        want = greedy_reference(target.model, prompt, 24, eos=set())
        for cap in range(1, 8):
            got, rounds = run(target, drafter, prompt, 24, max_draft=cap)
            assert got == want, (length, cap)
            assert all(len(r.proposed) <= cap for r in rounds)


def test_quantized_drafter_is_still_lossless(tiny_pair):
    target, _, drafter, config = load_pair(*map(str, tiny_pair), drafter_bits=4)
    assert config.drafter_bits == 4
    prompt = list(range(10, 60))
    assert run(target, drafter, prompt, 30)[0] == greedy_reference(target.model, prompt, 30, set())


def test_fixture_every_cap_and_length(qwen3_fixture_pair):
    target, _, drafter, _ = qwen3_fixture_pair
    prompt = [51, 258, 220, 22, 340]
    want = greedy_reference(target.model, prompt, 48, eos=set())
    for cap in range(1, 8):
        for max_new in (1, 2, 5, 8, 9, 23, 48):  # limits that fall inside accepted runs
            got, rounds = run(target, drafter, prompt, max_new, max_draft=cap)
            assert got == want[:max_new], (cap, max_new)
            assert sum(len(r.committed) for r in rounds) == max_new - 1


def test_stop_token_inside_an_accepted_run(qwen3_fixture_pair):
    target, _, drafter, _ = qwen3_fixture_pair
    prompt = [51, 258, 220, 22, 340]
    full, rounds = run(target, drafter, prompt, 48)
    # Pick a token that the drafter proposed and the target accepted mid-round, first seen there.
    pos = len(rounds[0].committed) + 1 + 2  # third token committed by round 2
    stop = full[pos]
    assert stop not in full[:pos] and rounds[1].accepted > 3
    got, got_rounds = run(target, drafter, prompt, 48, eos={stop})
    assert got == full[: pos + 1] == greedy_reference(target.model, prompt, 48, {stop})
    assert got_rounds[-1].committed[-1] == stop  # no bonus token after an accepted stop


def test_rounds_record_proposals_and_acceptance(qwen3_fixture_pair):
    target, _, drafter, _ = qwen3_fixture_pair
    tokens, rounds = run(target, drafter, [51, 258, 220, 22, 340], 48)
    for r in rounds:
        assert r.committed[: r.accepted] == r.proposed[: r.accepted]
        assert len(r.committed) == r.accepted + 1  # no stop token in this case: always a bonus
    assert tokens[1:] == [t for r in rounds for t in r.committed]


def test_bad_max_draft_and_empty_prompt(qwen3_fixture_pair):
    target, _, drafter, _ = qwen3_fixture_pair
    for cap in (0, 8):
        with pytest.raises(SpecDecError, match="--max-draft must be between 1 and 7"):
            run(target, drafter, [1, 2], 4, max_draft=cap)
    with pytest.raises(SpecDecError, match="prompt is empty"):
        run(target, drafter, [], 4)


def test_temperature_zero_is_greedy_and_seed_repeats(qwen3_fixture_pair):
    target, _, drafter, _ = qwen3_fixture_pair
    prompt = [51, 258, 220, 22, 340]
    greedy = run(target, drafter, prompt, 20)[0]
    assert run(target, drafter, prompt, 20, params=SamplingParams(temperature=0.0))[0] == greedy
    hot = SamplingParams(temperature=1.0, seed=7)
    assert (
        run(target, drafter, prompt, 20, params=hot)[0]
        == run(target, drafter, prompt, 20, params=hot)[0]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,mode",
    [("dspark_qwen3", "dspark"), ("zlab_dflash_qwen3", "dflash"), ("dspark_gemma4", "dspark")],
)
def test_padded_attention_matches_mlx_lm_greedy(name, mode):
    """The CUDA default (target and drafter attention over whole padded KV buffers, rows past
    the offset masked) gives mlx-lm's tokens and the same proposals as exact-length caches,
    across buffer growth (256-row steps), for every cap."""
    d = FIXTURES / name
    target, tokenizer, drafter, _ = load_pair(str(d / "target"), str(d / "drafter"), mode=mode)
    prompt = tokenizer.encode("The 7th of the numbers and letters " * 12)
    # mlx-lm's decoding with full KV caches: on sliding-window layers its default rotating cache
    # drifts from the model's own full forward here (position 314 of this Gemma-4 run), while
    # KVCache + window mask matches it; the speculative loop also matches it.
    steps = generate_step(
        mx.array(prompt), target.model, max_tokens=300, prompt_cache=target.make_cache(False)
    )
    want = [int(t) for t, _ in steps]
    for cap in (1, 3, None):
        proposals = []
        for padded in (False, True):
            target.padded_attention = padded  # the loop gives the drafter's state the same
            got, rounds = run(target, drafter, prompt, 300, max_draft=cap)
            assert got == want, (cap, padded)
            proposals.append([r.proposed for r in rounds])
        assert proposals[0] == proposals[1]
    assert type(target.make_cache()[0]).__name__ == "PaddedKVCache"
    assert type(drafter.new_state(target.padded_attention)[0]).__name__ == "PaddedKVCache"
