"""Lookup speculation is exact: drafts copied from n-gram matches change the speed, never the
output (greedy: mlx-lm's tokens; sampling: the target's law), alone or for the rounds of a
trained drafter whose match is long; its state survives the prefix cache."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from helpers import (
    FIXTURES,
    TOKENIZER_SOURCE,
    build_drafter,
    build_model,
    dflash_config,
    dspark_config,
    eagle3_config,
    greedy_reference,
    run,
    target_config,
)

from mlx_specdec import PrefixCache, SpecDecError, load_pair, speculative_generate
from mlx_specdec.cli import main
from mlx_specdec.drafters.lookup import LookupConfig, LookupDrafter, TokenIndex
from mlx_specdec.sampling import SamplingParams
from mlx_specdec.target import Target

FIXTURE = FIXTURES / "dspark_qwen3"


# ----------------------------------------------------------------------------- the index
def test_match_prefers_the_longest_then_the_most_recent():
    # "2 3" ends the text and occurs at positions 1 and 5: only the first extends back to
    # "7 2 3" like the end does, so the older one wins.
    older = TokenIndex(2, [7, 2, 3, 4, 5, 2, 3, 8, 6, 7, 2, 3])
    assert older.match(longest=64, candidates=8) == (3, 3)
    assert older.continuation(3, 3) == [4, 5, 2]
    assert older.match(longest=2, candidates=8) == (7, 2)  # capped: all tie, the most recent
    # Two equally long matches: the most recent.
    assert TokenIndex(2, [7, 2, 3, 4, 7, 2, 3, 5, 6, 7, 2, 3]).match(64, 8) == (7, 3)
    assert TokenIndex(2, [1, 2, 3, 4]).match(64, 8) == (0, 0)  # "3 4" never occurred before


def test_continuation_past_the_end_keeps_repeating():
    index = TokenIndex(2, [5, 6, 7, 5, 6])
    start, length = index.match(64, 8)
    assert (start, length) == (2, 2)
    assert index.continuation(start, 6) == [7, 5, 6, 7, 5, 6]


def test_config_is_checked():
    with pytest.raises(SpecDecError):
        LookupConfig(ngram=0)
    with pytest.raises(SpecDecError):
        LookupConfig(ngram=4, switch_at=3)


# ----------------------------------------------------------------------------- greedy identity
def copying_target(seed: int = 0) -> Target:
    """A tiny random Qwen3 whose token embedding dominates the residual stream: its next token
    depends mostly on the last one, so greedy decoding soon cycles and lookup drafts get
    accepted (a random target alone would hardly ever repeat itself)."""
    config = target_config(tied=False)
    model = build_model(config, seed)
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 50
    mx.eval(model.parameters())
    return Target(model, config, name="copying qwen3")


@pytest.fixture(scope="module")
def target() -> Target:
    return copying_target()


def test_lookup_alone_matches_mlx_lm_greedy(target):
    drafter = LookupDrafter(target.vocab_size)
    assert drafter.kind == "lookup" and drafter.tap_ids == () and bool(drafter)
    rounds_seen = []
    for prompt in ([7], list(range(10, 40)), [3, 4, 5, 3, 4, 5, 3, 4]):
        want = greedy_reference(target.model, prompt, 60, eos=set())
        for cap in (1, 3, None):
            got, rounds = run(target, drafter, prompt, 60, max_draft=cap)
            assert got == want, (prompt, cap)
            assert all(len(r.proposed) <= (cap or drafter.max_draft) for r in rounds)
            rounds_seen += rounds
    # Not vacuous: runs of accepted drafts, rejections and rounds without a match.
    assert any(r.accepted >= 3 for r in rounds_seen)
    assert any(r.accepted < len(r.proposed) for r in rounds_seen)
    assert any(not r.proposed for r in rounds_seen)


def test_stop_token_and_length_inside_a_lookup_run(target):
    prompt = list(range(10, 40))
    full = greedy_reference(target.model, prompt, 60, eos=set())
    drafter = LookupDrafter(target.vocab_size)
    for max_new in (1, 2, 17, 41):
        assert run(target, drafter, prompt, max_new)[0] == full[:max_new]
    stop = full[45]
    want = greedy_reference(target.model, prompt, 60, eos={stop})
    assert run(target, drafter, prompt, 60, eos={stop})[0] == want


class CountingDrafter:
    """Counts the rounds a wrapped drafter drafts (the others were lookup rounds)."""

    def __init__(self, drafter):
        self.drafter, self.calls = drafter, 0

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def propose(self, *args, **kwargs):
        self.calls += 1
        return self.drafter.propose(*args, **kwargs)


def trained_drafter(target: Target, family: str):
    """A random drafter of `family` for `target`, its taps set on the target."""
    configs = {
        "dspark": lambda: dspark_config(target.config, target_layer_ids=[1, 3]),
        "dflash": lambda: dflash_config(target.config, layers=1, taps=(1, 3)),
        "eagle3": lambda: eagle3_config(target.config, taps=(1, 3)),
    }
    drafter = build_drafter(configs[family](), seed=2)
    drafter.share_target_tensors(target)
    target.set_taps(drafter.tap_ids)
    return drafter


@pytest.mark.parametrize(
    "family,switch_at", [("dspark", 2), ("dspark", 6), ("dflash", 2), ("eagle3", 2)]
)
def test_trained_drafter_with_lookup_rounds_matches_mlx_lm_greedy(family, switch_at):
    target = copying_target(seed=1)
    counting = CountingDrafter(trained_drafter(target, family))
    drafter = LookupDrafter(target.vocab_size, counting, LookupConfig(switch_at=switch_at))
    assert drafter.kind == f"{family}+lookup" and drafter.tap_ids == (1, 3)
    prompt = list(range(10, 40))
    want = greedy_reference(target.model, prompt, 80, eos=set())
    for cap in (2, None):
        counting.calls = 0
        got, rounds = run(target, drafter, prompt, 80, max_draft=cap)
        assert got == want, cap
        # Both kinds of rounds ran: the trained drafter's and lookup's.
        assert 0 < counting.calls < len(rounds)


def test_trained_drafter_with_lookup_rounds_from_the_prefix_cache(target):
    # The trained drafter lags behind the rows on lookup rounds: a snapshot keeps what both
    # hold, and a warm turn still gives a cold turn's tokens.
    drafter = LookupDrafter(target.vocab_size, trained_drafter(target, "dspark"))
    warm, cold = warm_and_cold_turns(target, drafter)
    assert warm.tokens == cold.tokens


def warm_and_cold_turns(target: Target, drafter: LookupDrafter):
    """A first turn fills a prefix cache; its follow-up runs on it (warm, which must hit) and
    without it (cold)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER_SOURCE)
    first, cache = list(range(10, 40)), PrefixCache()
    turn = speculative_generate(
        target, tokenizer, drafter, first, max_new_tokens=30, prefix_cache=cache
    )
    follow_up = first + turn.tokens + [21, 22, 23]
    warm = speculative_generate(
        target, tokenizer, drafter, follow_up, max_new_tokens=40, prefix_cache=cache
    )
    cold = speculative_generate(target, tokenizer, drafter, follow_up, max_new_tokens=40)
    assert warm.prefix_cache == "hit" and warm.cached_tokens > len(first)
    return warm, cold


def test_sampled_lookup_q_is_a_point_mass(target):
    drafter = LookupDrafter(target.vocab_size)
    state = drafter.new_state()
    text = mx.array([1, 2, 3, 4, 5, 6, 9, 1, 2, 3, 4, 5, 6], mx.int32)  # 6 match: 3 drafts
    proposal = drafter.propose(state, None, text, 4, SamplingParams(1.0))
    assert proposal.tokens.tolist() == [9, 1, 2]
    assert proposal.q.shape == (3, target.vocab_size)
    assert proposal.q.sum(axis=-1).tolist() == [1.0] * 3
    assert mx.take_along_axis(proposal.q, proposal.tokens[:, None], -1).tolist() == [[1.0]] * 3


# ------------------------------------------------------------------------ loading, prefix cache
def test_load_pair_lookup_modes():
    target, _, drafter, config = load_pair(str(FIXTURE / "target"), mode="lookup")
    assert drafter.kind == config.mode == "lookup" and drafter.tap_ids == ()
    _, _, drafter, config = load_pair(
        str(FIXTURE / "target"), str(FIXTURE / "drafter"), lookup=True, drafter_bits=16
    )
    assert drafter.kind == config.mode == "dspark+lookup" and config.drafter_kind == "dspark"
    _, _, drafter, _ = load_pair(
        str(FIXTURE / "target"), str(FIXTURE / "drafter"), lookup=LookupConfig(switch_at=5)
    )
    assert drafter.lookup.switch_at == 5 and drafter.trained.kind == "dspark"
    with pytest.raises(SpecDecError, match="takes no --drafter"):
        load_pair(str(FIXTURE / "target"), str(FIXTURE / "drafter"), mode="lookup")
    with pytest.raises(SpecDecError, match="needs a speculative mode"):
        load_pair(str(FIXTURE / "target"), mode="baseline", lookup=True)


def test_auto_cap_of_lookup_is_its_own(tmp_path):
    target, tokenizer, drafter, _ = load_pair(str(FIXTURE / "target"), mode="lookup")
    cap_cache = tmp_path / "caps.json"
    result = speculative_generate(
        target,
        tokenizer,
        drafter,
        [5, 6, 7],
        max_new_tokens=8,
        max_draft="auto",
        cap_cache=cap_cache,
    )
    assert len(result.tokens) == 8 and not cap_cache.exists()  # nothing to calibrate


def test_prefix_cache_turn_keeps_the_lookup_rows(target):
    # A follow-up turn restores the drafter's rows (the tokens) with the target's caches, so
    # lookup matches what came before the cut exactly as a cold run does.
    warm, cold = warm_and_cold_turns(target, LookupDrafter(target.vocab_size))
    assert warm.tokens == cold.tokens
    assert [r.proposed for r in warm.rounds] == [r.proposed for r in cold.rounds]
    assert any(r.accepted for r in warm.rounds)


# ----------------------------------------------------------------------------- sampling
sampling_tests = importlib.import_module("test_sampling")
# Lookup drafts few tokens a round, so fewer rejections to catch: twice the loop check's tokens
# (a broken residual then gives p ~ 1e-13 here).
LOOP_TOKENS = 2 * sampling_tests.LOOP_TOKENS


def sampling_pairs(name: str):
    target = sampling_tests.tiny_target()
    if name == "lookup":
        return target, LookupDrafter(target.vocab_size)
    trained = sampling_tests.DRAFTERS["dspark-markov"](target)
    return target, LookupDrafter(target.vocab_size, trained, LookupConfig(switch_at=3))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lookup", "dspark+lookup"])
def test_sampled_lookup_follows_the_target_law(name):
    target, drafter = sampling_pairs(name)
    pvalue, rounds = sampling_tests.loop_pvalue(
        target, drafter, sampling_tests.SETTINGS["t0.8-all"], tokens=LOOP_TOKENS
    )
    assert pvalue > sampling_tests.ALPHA, f"p-value {pvalue:.2e}"
    assert any(r.accepted < len(r.proposed) for r in rounds)
    assert any(r.accepted >= 2 for r in rounds)


@pytest.mark.slow
def test_sampled_lookup_check_rejects_a_broken_verify(monkeypatch):
    # With a point mass, skipping the residual (resampling from p, x included, after a
    # rejection of x) over-weights the rejected draft: the same check must catch it.
    target, drafter = sampling_pairs("lookup")
    broken = sampling_tests.broken_no_residual
    monkeypatch.setattr(sampling_tests.speculate_module, "verify", broken)
    pvalue, _ = sampling_tests.loop_pvalue(
        target, drafter, sampling_tests.SETTINGS["t0.8-all"], tokens=LOOP_TOKENS
    )
    assert pvalue < sampling_tests.ALPHA, f"broken loop passed: p-value {pvalue:.2e}"


# ----------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_generate_and_bench_lookup(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SPECDEC_CACHE", str(tmp_path / "cache"))
    model = str(FIXTURE / "target")
    rc = main(
        [
            "generate",
            "--model",
            model,
            "--mode",
            "lookup",
            "--prompt",
            "ab ab ab ab",
            "--max-new-tokens",
            "16",
            "--compare",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "[lookup]" in out and "outputs identical" in out
    rc = main(
        [
            "bench",
            "--model",
            model,
            "--drafter",
            f"dspark={FIXTURE / 'drafter'}",
            "--modes",
            "baseline,lookup,dspark+lookup",
            "--prompts",
            "edit",
            "--limit",
            "2",
            "--trials",
            "1",
            "--max-new-tokens",
            "8",
            "--lookup-switch",
            "2,4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "| lookup@16 |" in out and "lossless: yes" in out
    assert "| dspark+lookup@16 switch 2 |" in out and "| dspark+lookup@16 switch 4 |" in out


def test_default_switch_follows_the_backend():
    assert LookupConfig().switch_at == (2 if mx.default_device() == mx.cpu else 8)
