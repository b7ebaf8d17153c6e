"""Log-probabilities and penalties are plain decoding's: with mlx-lm's logits processors
(repetition, presence, frequency penalties, logit bias) the speculative output is mlx-lm's
penalised decoding, token for token when greedy and in law when sampling, and the reported
log-probabilities are the ones mlx-lm's `generate_step` yields, bit for bit on the CPU."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from helpers import TOKENIZER_SOURCE, build_drafter, dspark_config
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_specdec import PrefixCache, SpecDecError, load_pair, speculate, speculative_generate
from mlx_specdec.drafters.lookup import LookupConfig, LookupDrafter
from mlx_specdec.generate import encode_prompt, stream_speculative_generate
from mlx_specdec.sampling import penalty_processors, probs, process_rows

sampling_tests = importlib.import_module("test_sampling")
lookup_tests = importlib.import_module("test_lookup")

PENALTIES = {
    "none": {},
    "repetition": dict(repetition_penalty=1.3),
    "mixed": dict(presence_penalty=0.6, frequency_penalty=0.4, logit_bias={22: 2.0, 30: -1.0}),
}


def processors_of(settings: dict) -> list:
    """What an mlx-lm user passes for the same settings."""
    return make_logits_processors(
        settings.get("logit_bias"),
        settings.get("repetition_penalty"),
        20,
        settings.get("presence_penalty"),
        20,
        settings.get("frequency_penalty"),
        20,
    )


def plain(model, prompt: list[int], n: int, processors: list, top: int = 3):
    """mlx-lm's generate_step: its tokens, their logprobs and the top `top` (id, logprob)."""
    tokens, chosen, tops = [], [], []
    gen = generate_step(mx.array(prompt), model, max_tokens=n, logits_processors=processors)
    for token, row in gen:
        token = int(token)
        order = np.argsort(-np.array(row), kind="stable")[:top]
        tokens.append(token)
        chosen.append(row[token].item())
        tops.append(sorted(np.array(row)[order].tolist(), reverse=True))
    return tokens, chosen, tops


def check_against_plain(target, tokenizer, drafter, prompt, settings, n=48):
    want, want_lp, want_top = plain(target.model, prompt, n, processors_of(settings))
    got = speculative_generate(
        target,
        tokenizer,
        drafter,
        prompt,
        max_new_tokens=n,
        logprobs=True,
        top_logprobs=3,
        **settings,
    )
    k = len(got.tokens)
    assert got.tokens == want[:k]
    assert got.logprobs == want_lp[:k]  # bit for bit
    assert [[v for _, v in row] for row in got.top_logprobs] == want_top[:k]
    assert all(row[0][1] >= row[-1][1] for row in got.top_logprobs)  # best first
    return got


@pytest.fixture(scope="module")
def demo():
    return load_pair(mode="dspark")


@pytest.mark.parametrize("settings", list(PENALTIES))
def test_demo_dspark_greedy_and_logprobs_are_mlx_lms(demo, settings):
    target, tokenizer, drafter, _ = demo
    rounds = []
    for text in ("def read_lines(path):", "def __init__(self, host, port):"):
        prompt = encode_prompt(tokenizer, text)
        got = check_against_plain(target, tokenizer, drafter, prompt, PENALTIES[settings])
        rounds += got.rounds
    assert any(r.accepted >= 3 for r in rounds)  # multi-token rounds were verified


@pytest.mark.parametrize("settings", ["repetition", "mixed"])
def test_lookup_and_baseline_greedy_and_logprobs_are_mlx_lms(settings):
    target = lookup_tests.copying_target()
    tokenizer = load_tokenizer(TOKENIZER_SOURCE)
    trained = build_drafter(dspark_config(target.config, target_layer_ids=[1, 3]), seed=2)
    target.set_taps(trained.tap_ids)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    for drafter in (
        LookupDrafter(target.vocab_size),
        LookupDrafter(target.vocab_size, trained, LookupConfig(switch_at=2)),
        None,  # mlx-lm's own decoding, through the same keywords
    ):
        check_against_plain(target, tokenizer, drafter, prompt, PENALTIES[settings])


def test_chunks_carry_the_logprobs_of_their_tokens(demo):
    target, tokenizer, drafter, _ = demo
    prompt = encode_prompt(tokenizer, "What is 12 + 30?")
    chunks = list(
        stream_speculative_generate(
            target, tokenizer, drafter, prompt, max_new_tokens=40, top_logprobs=2
        )
    )
    result = chunks[-1].result
    assert result.finish_reason == "stop"  # the stop token is not shown, nor its logprob
    assert [lp for c in chunks for lp in c.logprobs] == result.logprobs
    assert all(len(c.logprobs) == len(c.tokens) == len(c.top_logprobs) for c in chunks)
    assert len(result.logprobs) == len(result.tokens)
    plain_run = speculative_generate(target, tokenizer, drafter, prompt, max_new_tokens=40)
    assert plain_run.logprobs is None and plain_run.tokens == result.tokens


@pytest.mark.parametrize("with_drafter", [True, False])
def test_prefix_cache_keeps_the_penalty_history(demo, with_drafter):
    # The cached prompt tokens still count for the penalties: a warm turn is a cold one.
    target, tokenizer, drafter, _ = demo
    drafter = drafter if with_drafter else None
    first = encode_prompt(tokenizer, "def read_lines(path):")
    settings = dict(PENALTIES["mixed"], logprobs=True, max_new_tokens=24)
    cache = PrefixCache()
    turn = speculative_generate(target, tokenizer, drafter, first, prefix_cache=cache, **settings)
    follow_up = first + turn.tokens + encode_prompt(tokenizer, "def f(x):", chat=False)
    warm = speculative_generate(
        target, tokenizer, drafter, follow_up, prefix_cache=cache, **settings
    )
    cold = speculative_generate(target, tokenizer, drafter, follow_up, **settings)
    assert warm.prefix_cache == "hit" and warm.cached_tokens > len(first)
    assert (warm.tokens, warm.logprobs) == (cold.tokens, cold.logprobs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(logit_bias={512: 1.0}),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={"7": 1.0}),
        dict(logit_bias={7: float("nan")}),
        dict(repetition_penalty=-0.5),
        dict(presence_penalty=float("inf")),
        dict(frequency_penalty="1"),
        dict(penalty_context_size=0),
        dict(top_logprobs=-1),
        dict(top_logprobs=2.0),
    ],
)
def test_bad_settings_raise(demo, kwargs):
    target, tokenizer, drafter, _ = demo
    with pytest.raises(SpecDecError):
        speculative_generate(target, tokenizer, drafter, "hi", max_new_tokens=2, **kwargs)


def test_neutral_settings_add_no_processor():
    assert penalty_processors(8, repetition_penalty=1.0, presence_penalty=0.0) == []
    assert len(penalty_processors(8, logit_bias={1: 1.0}, frequency_penalty=0.1)) == 2


def test_verify_rows_see_the_history_plain_decoding_sees():
    # Row j of a verify is penalised for the history and the first j drafts, exactly as the
    # plain decode step at that position is.
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(0, 1, (4, 9)), mx.float32)
    history, drafts = [1, 2, 2, 5], mx.array([3, 3, 7], mx.int32)
    processors = processors_of(dict(repetition_penalty=1.5, frequency_penalty=0.7))
    rows = process_rows(logits, history, processors, drafts)
    for j in range(4):
        want = logits[j : j + 1]
        seen = mx.array(history + drafts[:j].tolist())
        for p in processors:
            want = p(seen, want)
        assert mx.array_equal(rows[j : j + 1], want), j


# ----------------------------------------------------------------------------- sampling
PENALISED = dict(repetition_penalty=2.0, presence_penalty=1.0, logit_bias={1: 1.5})


def penalised_loop_pvalue(target, drafter, params, checked, used, tokens=1000, runs=20, seed=0):
    """`test_sampling.loop_pvalue` with logits processors: the loop runs with `used`, and each
    emitted token is checked against the target's penalised law after the tokens before it
    (`checked` applied to one forward over prompt + output, row by row)."""
    V = sampling_tests.V
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    counts, expected, rounds = np.zeros((V, V)), np.zeros((V, V)), []
    for _ in range(runs):
        prompt = rng.integers(0, V, rng.integers(1, 5)).tolist()
        out = []
        for step in speculate(
            target,
            drafter,
            prompt,
            max_new_tokens=tokens // runs,
            params=params,
            logits_processors=used,
        ):
            out += step.tokens
            rounds += [step.round] if step.round is not None else []
        logits = target.model(mx.array([prompt + out[:-1]]))[0, len(prompt) - 1 :]
        rows = [process_rows(logits[j : j + 1], prompt + out[:j], checked) for j in range(len(out))]
        p = np.array(probs(mx.concatenate(rows), params), np.float64)
        y, prev = np.array(out), np.array(prompt[-1:] + out[:-1])
        if (p[np.arange(len(y)), y] <= 0).any():
            return 0.0, rounds
        np.add.at(counts, (prev, y), 1)
        np.add.at(expected, prev, p)
    return sampling_tests.chi2_pvalue(counts, expected / counts.sum()), rounds


@pytest.mark.slow
def test_penalised_sampling_follows_the_penalised_law():
    target = sampling_tests.tiny_target()
    drafter = sampling_tests.DRAFTERS["dspark-markov"](target)
    params = sampling_tests.SETTINGS["t0.8-all"]
    processors = processors_of(PENALISED)
    pvalue, rounds = penalised_loop_pvalue(target, drafter, params, processors, processors)
    assert pvalue > sampling_tests.ALPHA, f"p-value {pvalue:.2e}"
    assert any(r.accepted >= 2 for r in rounds)
    assert any(r.accepted < len(r.proposed) for r in rounds)


@pytest.mark.slow
def test_penalised_check_rejects_a_loop_that_ignores_the_penalties():
    target = sampling_tests.tiny_target()
    drafter = sampling_tests.DRAFTERS["dspark-markov"](target)
    params = sampling_tests.SETTINGS["t1"]  # no truncation: the counts, not a forbidden token
    pvalue, _ = penalised_loop_pvalue(target, drafter, params, processors_of(PENALISED), [])
    assert pvalue < sampling_tests.ALPHA, f"an unpenalised loop passed: p-value {pvalue:.2e}"


def test_cli_generate_penalties_compare(capsys, tmp_path, monkeypatch):
    from helpers import FIXTURES

    from mlx_specdec.cli import main

    monkeypatch.setenv("MLX_SPECDEC_CACHE", str(tmp_path / "cache"))
    pair = FIXTURES / "dspark_qwen3"
    penalties = ["--repetition-penalty", "1.3", "--presence-penalty", "0.5"]
    rc = main(
        [
            "generate",
            "--model",
            str(pair / "target"),
            "--drafter",
            str(pair / "drafter"),
            "--prompt",
            "The 7th of the numbers",
            "--max-new-tokens",
            "16",
            "--max-draft",
            "3",
            *penalties,
            "--compare",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "outputs identical" in out
