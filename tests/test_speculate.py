"""Lossless greedy: the verify loop gives token-for-token what plain mlx-lm decoding gives."""

from __future__ import annotations

import random

import pytest
from conftest import (
    FIXTURES,
    dspark_config,
    greedy_reference,
    target_config,
    write_dspark,
    write_target,
)
from fixture_trace import run

from mlx_specdec import SpecDecError, load_pair
from mlx_specdec.sampling import SamplingParams


@pytest.fixture(scope="module")
def fixture_pair():
    d = FIXTURES / "dspark_qwen3"
    return load_pair(str(d / "target"), str(d / "drafter"), drafter_bits=16)


@pytest.mark.parametrize(
    "family,tied,seed",
    [("qwen3", False, 0), ("qwen3", True, 1), ("llama", False, 2), ("llama", True, 3)],
)
def test_random_targets_match_mlx_lm_greedy(tmp_path, family, tied, seed):
    config = target_config(family, tied)
    target_dir = write_target(tmp_path / "t", config, seed=seed)
    drafter_dir = write_dspark(tmp_path / "d", dspark_config(config), seed=seed + 10)
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
    target, _, drafter, config = load_pair(*map(str, tiny_pair))  # default: 4-bit drafter
    assert config.drafter_bits == 4
    prompt = list(range(10, 60))
    assert run(target, drafter, prompt, 30)[0] == greedy_reference(target.model, prompt, 30, set())


def test_fixture_every_cap_and_length(fixture_pair):
    target, _, drafter, _ = fixture_pair
    prompt = [51, 258, 220, 22, 340]
    want = greedy_reference(target.model, prompt, 48, eos=set())
    for cap in range(1, 8):
        for max_new in (1, 2, 5, 8, 9, 23, 48):  # limits that fall inside accepted runs
            got, rounds = run(target, drafter, prompt, max_new, max_draft=cap)
            assert got == want[:max_new], (cap, max_new)
            assert sum(len(r.committed) for r in rounds) == max_new - 1


def test_stop_token_inside_an_accepted_run(fixture_pair):
    target, _, drafter, _ = fixture_pair
    prompt = [51, 258, 220, 22, 340]
    full, rounds = run(target, drafter, prompt, 48)
    # Pick a token that the drafter proposed and the target accepted mid-round, first seen there.
    pos = len(rounds[0].committed) + 1 + 2  # third token committed by round 2
    stop = full[pos]
    assert stop not in full[:pos] and rounds[1].accepted > 3
    got, got_rounds = run(target, drafter, prompt, 48, eos={stop})
    assert got == full[: pos + 1] == greedy_reference(target.model, prompt, 48, {stop})
    assert got_rounds[-1].committed[-1] == stop  # no bonus token after an accepted stop


def test_rounds_record_proposals_and_acceptance(fixture_pair):
    target, _, drafter, _ = fixture_pair
    tokens, rounds = run(target, drafter, [51, 258, 220, 22, 340], 48)
    for r in rounds:
        assert r.committed[: r.accepted] == r.proposed[: r.accepted]
        assert len(r.committed) == r.accepted + 1  # no stop token in this case: always a bonus
    assert tokens[1:] == [t for r in rounds for t in r.committed]


def test_bad_max_draft_and_empty_prompt(fixture_pair):
    target, _, drafter, _ = fixture_pair
    for cap in (0, 8):
        with pytest.raises(SpecDecError, match="--max-draft must be between 1 and 7"):
            run(target, drafter, [1, 2], 4, max_draft=cap)
    with pytest.raises(SpecDecError, match="prompt is empty"):
        run(target, drafter, [], 4)


def test_temperature_zero_is_greedy_and_seed_repeats(fixture_pair):
    target, _, drafter, _ = fixture_pair
    prompt = [51, 258, 220, 22, 340]
    greedy = run(target, drafter, prompt, 20)[0]
    assert run(target, drafter, prompt, 20, params=SamplingParams(temperature=0.0))[0] == greedy
    hot = SamplingParams(temperature=1.0, seed=7)
    assert (
        run(target, drafter, prompt, 20, params=hot)[0]
        == run(target, drafter, prompt, 20, params=hot)[0]
    )
