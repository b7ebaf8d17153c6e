"""Speculative sampling is exact: what the loop emits follows the target's own sampling law.

How the proof is split, and why. One real `speculate` call costs several milliseconds of MLX
dispatch on a CPU, so 20k+ end-to-end generations per setting would take minutes. The guarantee
is therefore built from three statistical checks, all against the *exact* law of the target,
computed by enumerating every continuation of a tiny random Qwen3 (vocabulary `V`):

1. **Round kernel, batched (>= 20k rows per setting).** One speculative round from a fixed state,
   exactly as the loop runs it — drafts drawn from `q`, the target's real logits for
   `[anchor, *drafts]` (one batched forward over every possible draft), the production `verify`
   — for every row at once, each row then completed by plain target sampling to `LAW_LEN`
   tokens. The joint of the first `LAW_LEN` tokens must be the target's, for caps 1, 2 and full
   and with top-p / top-k / min-p. `q` is a random Markov chain (each slot depends on the
   previous draft, like DSpark), truncated by the same settings, so it differs from `p` in
   shape and support and every branch of `verify` (accept, residual, bonus) carries mass.
   The same check must *reject* three broken samplers (`BROKEN`), which puts its power on record.
2. **Drafter contract (any drafter).** Exactness needs each draft to be drawn from the `q` its
   drafter reports. Many `propose` calls from one state: counts of (previous draft, draft) per
   slot against the sum of the reported `q` rows.
3. **The real loop (any target/drafter pair, 1000 tokens).** `speculate` itself, end to end,
   over 20 short runs from random prompts: every emitted token is checked against the target's
   law after exactly the tokens before it (one forward over the output), so multi-draft rounds,
   residuals, bonus tokens, rollback, confidence cuts and the drafter state after a rejection
   are all covered. Patching a broken verify into the loop must make this check fail too.

Plus: `probs` equals an independent numpy reading of mlx-lm's filters, and mlx-lm's own sampler
draws from it; same seed -> same output; temperature 0 is exactly greedy; bad settings raise.

Drafters: DSpark with a Markov head and with `markov_rank` 0, DFlash and EAGLE3 (`DRAFTERS`).

Statistics: Pearson chi-square, cells with expected count < 5 pooled, p-value from the
Wilson-Hilferty normal approximation (no scipy); any draw in a cell of probability 0 fails
outright. Significance `ALPHA` = 1e-3 per check (Bonferroni within a multi-slot check). Seeds are
fixed, so every run draws the same samples: a pass or fail is reproducible, and the stated level
is the chance that a correct sampler would have been flagged by the chosen seed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    build_drafter,
    build_model,
    dflash_config,
    dspark_config,
    eagle3_config,
    target_config,
)
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_specdec import SpecDecError, speculate, speculative_generate
from mlx_specdec.drafters.base import Drafter, Proposal
from mlx_specdec.drafters.dflash import DFlashDrafter
from mlx_specdec.drafters.dspark import DSparkDrafter
from mlx_specdec.drafters.eagle3 import Eagle3Drafter
from mlx_specdec.sampling import (
    SamplingParams,
    accept_length,
    correction,
    draw,
    probs,
    sample,
    verify,
)
from mlx_specdec.speculate import Round
from mlx_specdec.target import Target

V = 5  # vocabulary: small enough to enumerate every continuation
LAW_LEN = 3  # tokens whose joint law the kernel check compares (V**3 cells)
ALPHA = 1e-3
PROMPT = [0, 4]
BLOCK = 4  # the tiny drafter's block: "full" cap
# The package re-exports the function `speculate` under the module's name; patch the module.
speculate_module = importlib.import_module("mlx_specdec.speculate")

SETTINGS = {
    "t1": SamplingParams(1.0),
    "t0.7-top_p0.8": SamplingParams(0.7, top_p=0.8),
    "t1.3-top_k3": SamplingParams(1.3, top_k=3),
    "t1-min_p0.2": SamplingParams(1.0, min_p=0.2),
    "t0.8-all": SamplingParams(0.8, top_p=0.9, top_k=3, min_p=0.05),
}

VerifyFn = Callable[[mx.array, mx.array, mx.array, SamplingParams], tuple[mx.array, mx.array]]


# ----------------------------------------------------------------------------- statistics
def chi2_pvalue(counts: np.ndarray, law: np.ndarray) -> float:
    """P-value of Pearson's chi-square for `counts` drawn from `law` (both flat)."""
    counts, law = counts.astype(np.float64).ravel(), law.astype(np.float64).ravel()
    n = counts.sum()
    if counts[law <= 0].sum() > 0:
        return 0.0  # a draw the law forbids (e.g. outside the top-k): no sampling noise explains it
    expected = n * law[law > 0]
    counts = counts[law > 0]
    order = np.argsort(expected)
    expected, counts = expected[order], counts[order]
    # Pool the rarest cells until every bin expects >= 5 draws.
    small = np.searchsorted(np.cumsum(expected), 5.0) + 1
    while small < len(expected) and expected[small - 1] < 5:
        small += 1
    small = min(small, len(expected))
    if small > 1:
        expected = np.concatenate([[expected[:small].sum()], expected[small:]])
        counts = np.concatenate([[counts[:small].sum()], counts[small:]])
    dof = len(expected) - 1
    if dof < 1:
        return 1.0
    stat = float(((counts - expected) ** 2 / expected).sum())
    # Wilson-Hilferty: (X/k)^(1/3) is close to normal with mean 1 - 2/(9k), variance 2/(9k).
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def tv(counts: np.ndarray, law: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts.ravel() / counts.sum() - law.ravel()).sum())


def test_chi2_pvalue_is_calibrated():
    # The helper itself: exact-law samples pass, a 5 % shift in one cell of 40k fails.
    rng = np.random.default_rng(0)
    law = rng.dirichlet(np.ones(50))
    draws = rng.choice(50, size=40_000, p=law)
    assert chi2_pvalue(np.bincount(draws, minlength=50), law) > ALPHA
    skewed = law.copy()
    skewed[0] += 0.05
    draws = rng.choice(50, size=40_000, p=skewed / skewed.sum())
    assert chi2_pvalue(np.bincount(draws, minlength=50), law) < 1e-6
    forbidden = law.copy()
    forbidden[3] = 0
    assert chi2_pvalue(np.bincount(draws, minlength=50), forbidden / forbidden.sum()) == 0.0
    # Under the null the p-values are roughly uniform: few of 200 fall below 0.05.
    small = sum(
        chi2_pvalue(np.bincount(rng.choice(50, size=2_000, p=law), minlength=50), law) < 0.05
        for _ in range(200)
    )
    assert small <= 20


# ----------------------------------------------------------------------------- tiny models
TAPS = (0, 1)


def tiny_target(seed: int = 0) -> Target:
    config = target_config(
        tied=False,
        layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=256,
        rope_theta=1e4,
    )
    model = build_model(config, seed)
    # Sharpen the random head: varied, peaky distributions make truncation and rejection matter.
    model.lm_head.weight = model.lm_head.weight * 1.5
    mx.eval(model.parameters())
    return Target(model, config, name="tiny qwen3")


def tiny_dspark(target: Target, markov_rank: int, seed: int) -> DSparkDrafter:
    config = dspark_config(
        target.config,
        markov_rank,
        num_hidden_layers=1,
        block_size=BLOCK,
        mask_token_id=V - 1,
        target_layer_ids=list(TAPS),
    )
    drafter = build_drafter(config, seed)
    if markov_rank:  # a strong transition bias, so slot k's q really depends on draft k-1
        head = drafter.markov_head
        head.markov_w2.weight = head.markov_w2.weight * 6
    # Confidences spread over (0, 1), so a threshold really cuts rounds at varying slots.
    drafter.confidence_head.proj.weight = drafter.confidence_head.proj.weight * 20
    mx.eval(drafter.parameters())
    target.set_taps(drafter.tap_ids)
    return drafter


def tiny_dflash(target: Target, seed: int) -> DFlashDrafter:
    config = dflash_config(target.config, layers=1, block_size=BLOCK + 1, mask_id=V - 1, taps=TAPS)
    drafter = build_drafter(config, seed)
    drafter.share_target_tensors(target)  # DFlash always drafts through the target's head
    target.set_taps(drafter.tap_ids)
    return drafter


def tiny_eagle3(target: Target, seed: int) -> Eagle3Drafter:
    drafter = build_drafter(eagle3_config(target.config, taps=TAPS, ttt_length=BLOCK), seed)
    drafter.lm_head.weight = drafter.lm_head.weight * 3
    mx.eval(drafter.parameters())
    target.set_taps(drafter.tap_ids)
    return drafter


@pytest.fixture(scope="module")
def target() -> Target:
    return tiny_target()


# Drafters run through the generic drafter-contract and real-loop checks: name -> builder.
DRAFTERS: dict[str, Callable[[Target], Drafter]] = {
    "dspark-markov": lambda t: tiny_dspark(t, markov_rank=4, seed=1),
    "dspark-rank0": lambda t: tiny_dspark(t, markov_rank=0, seed=2),
    "dflash": lambda t: tiny_dflash(t, seed=3),
    "eagle3": lambda t: tiny_eagle3(t, seed=4),
}


@pytest.fixture(scope="module", params=list(DRAFTERS))
def pair(request: pytest.FixtureRequest) -> tuple[Target, Drafter]:
    t = tiny_target()  # own target per drafter: taps are set on it
    return t, DRAFTERS[request.param](t)


# ----------------------------------------------------------------------------- exact law
def all_sequences(length: int) -> np.ndarray:
    """Every token sequence of `length`, in base-V order (row i spells i in base V)."""
    if length == 0:
        return np.zeros((1, 0), np.int32)
    grid = np.indices((V,) * length).reshape(length, -1).T
    return grid.astype(np.int32)


def target_logits(target: Target, prompt: list[int], length: int) -> mx.array:
    """[V**length, length+1, V]: the target's logits after the prompt and after each prefix of
    every continuation of `length` tokens (one batched forward, no cache)."""
    seqs = all_sequences(length)
    ids = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logits = target.model(mx.array(ids))
    return logits[:, len(prompt) - 1 :].astype(mx.float32)


def exact_law(target: Target, prompt: list[int], length: int, params: SamplingParams) -> np.ndarray:
    """The joint law of the first `length` sampled tokens, shape (V,) * length."""
    p = np.array(probs(target_logits(target, prompt, length - 1), params), np.float64)
    seqs = all_sequences(length - 1)
    law = np.ones(len(seqs))
    for j in range(length - 1):
        law *= p[np.arange(len(seqs)), j, seqs[:, j]]
    return (law[:, None] * p[:, length - 1]).reshape((V,) * length)


def test_exact_law_sums_to_one_and_respects_truncation(target):
    law = exact_law(target, PROMPT, LAW_LEN, SETTINGS["t1.3-top_k3"])
    assert law.sum() == pytest.approx(1.0, abs=1e-5)
    # top-k 3 of 5: every position keeps 3 tokens, so 3**3 sequences carry all the mass.
    assert (law > 0).sum() == 3**LAW_LEN


# ----------------------------------------------------------------------------- the round kernel
def broken_accept_with_p(draft, q, logits, params):
    """Accepts a draft with probability p(x) instead of min(1, p(x)/q(x))."""
    p = probs(logits, params)
    p_x = mx.take_along_axis(p[..., : draft.shape[-1], :], draft[..., None], axis=-1)[..., 0]
    accepted = mx.cumprod(mx.random.uniform(shape=p_x.shape) < p_x, axis=-1).sum(axis=-1)
    return accepted, draw(correction(p, q, accepted))


def broken_no_residual(draft, q, logits, params):
    """After a rejection, resamples from p instead of norm(max(p - q, 0))."""
    p = probs(logits, params)
    accepted = accept_length(draft, q, p)
    return accepted, draw(correction(p, None, accepted))


def broken_untruncated_p(draft, q, logits, params):
    """Verifies against the untruncated p (top-p / top-k / min-p ignored on the target side)."""
    return verify(draft, q, logits, SamplingParams(params.temperature))


BROKEN: dict[str, VerifyFn] = {
    "accept-with-p": broken_accept_with_p,
    "no-residual": broken_no_residual,
    "untruncated-p": broken_untruncated_p,
}


def round_counts(
    target: Target,
    prompt: list[int],
    params: SamplingParams,
    n: int,
    rows: int,
    verify_fn: VerifyFn = verify,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One round of `n` drafts from the prompt, for `rows` independent rows, each completed by
    plain target sampling: counts of the first LAW_LEN tokens, and of the accepted lengths."""
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    # The target's logits after the prompt + every possible draft sequence (row = its base-V
    # code): the verify logits of any row are one lookup.
    table = target_logits(target, prompt, n)
    # The drafter: a decent but wrong guess of the target, Markov in the previous draft like
    # DSpark's head, truncated by the same filters (so its support differs from p's too).
    noise = mx.array(rng.normal(0, 1.5, (n, V, V)), mx.float32)
    prev = mx.full((rows,), prompt[-1], mx.int32)
    code = mx.zeros((rows,), mx.int32)
    drafts, qs = [], []
    for k in range(n):
        guess = table[code * V ** (n - k), k]  # the target's logits after drafts 0..k-1
        qs.append(probs(guess + noise[k][prev], params))
        prev = draw(qs[-1]).astype(mx.int32)
        drafts.append(prev)
        code = code * V + prev
    draft, q, logits = mx.stack(drafts, axis=1), mx.stack(qs, axis=1), table[code]
    accepted, next_token = verify_fn(draft, q, logits, params)
    accepted, next_token, draft = (np.array(a) for a in (accepted, next_token, draft))

    out = np.zeros((rows, LAW_LEN), np.int64)
    length = np.minimum(accepted + 1, LAW_LEN)
    for j in range(LAW_LEN):
        out[:, j] = np.where(j < accepted, draft[:, min(j, n - 1)], next_token)
    # Complete short rows by plain sampling from the target's law after what they committed.
    p = np.array(probs(target_logits(target, prompt, LAW_LEN - 1), params), np.float64)
    for j in range(1, LAW_LEN):
        short = length <= j
        prefix = (out[:, :j] * V ** np.arange(LAW_LEN - 2, LAW_LEN - 2 - j, -1)).sum(axis=1)
        cdf = np.cumsum(p[prefix, j], axis=-1)
        fill = np.minimum((cdf < rng.random((rows, 1)) * cdf[:, -1:]).sum(axis=1), V - 1)
        out[:, j] = np.where(short, fill, out[:, j])
    codes = (out * V ** np.arange(LAW_LEN - 1, -1, -1)).sum(axis=1)
    return np.bincount(codes, minlength=V**LAW_LEN), np.bincount(accepted, minlength=n + 1)


@pytest.mark.parametrize("cap", [1, 2, BLOCK])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_round_kernel_follows_the_target_law(target, setting, cap):
    params = SETTINGS[setting]
    law = exact_law(target, PROMPT, LAW_LEN, params)
    counts, accepted = round_counts(target, PROMPT, params, cap, rows=40_000, seed=cap)
    pvalue = chi2_pvalue(counts, law)
    assert pvalue > ALPHA, f"p-value {pvalue:.2e}, TV {tv(counts, law):.4f}"
    # Not vacuous: rejections at the first draft, and full acceptance (the bonus), both common.
    assert accepted[0] > 0.02 * 40_000 and accepted[cap] > 0.02 * 40_000, accepted


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("cap", [2, BLOCK])
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "t1"])  # all truncate
def test_round_kernel_check_rejects_broken_samplers(target, setting, cap, broken):
    params = SETTINGS[setting]
    law = exact_law(target, PROMPT, LAW_LEN, params)
    counts, _ = round_counts(target, PROMPT, params, cap, 40_000, BROKEN[broken], seed=cap)
    pvalue = chi2_pvalue(counts, law)
    assert pvalue < ALPHA, f"{broken} passed: p-value {pvalue:.2e}, TV {tv(counts, law):.4f}"


def test_round_kernel_from_other_states(target):
    # Other anchors / contexts than PROMPT, at the full cap.
    params = SETTINGS["t0.8-all"]
    for prompt in ([4], [0, 2, 2, 1]):
        law = exact_law(target, prompt, LAW_LEN, params)
        counts, _ = round_counts(target, prompt, params, BLOCK, rows=25_000, seed=len(prompt))
        assert chi2_pvalue(counts, law) > ALPHA, prompt


# ----------------------------------------------------------------------------- drafter contract
DRAFT_SAMPLES = 800


def drafts_pvalues(
    target: Target,
    drafter: Drafter,
    params: SamplingParams,
    samples: int,
    seed: int = 0,
    wrap: Callable[[Proposal], Proposal] | None = None,
) -> list[float]:
    """Per slot k, a chi-square of the counts of (draft k-1, draft k) against the sum of the
    reported q_k rows: each draft must be drawn from the q its drafter reports."""
    mx.random.seed(seed)
    anchor, n = 2, drafter.max_draft
    _, taps = target.prefill(mx.array(PROMPT, mx.int32), target.make_cache())
    next_tokens = mx.array(PROMPT[1:] + [anchor], mx.int32)
    tokens, qs = [], []
    for _ in range(samples):
        proposal = drafter.propose(drafter.new_state(), taps, next_tokens, n, params)
        if wrap is not None:
            proposal = wrap(proposal)
        mx.eval(proposal.tokens, proposal.q)
        tokens.append(np.array(proposal.tokens))
        qs.append(np.array(proposal.q, np.float64))
    x, q = np.stack(tokens), np.stack(qs)  # [S, n], [S, n, V]
    prev = np.concatenate([np.full((samples, 1), anchor), x[:, :-1]], axis=1)
    pvalues = []
    for k in range(n):
        counts = np.zeros((V, V))
        expected = np.zeros((V, V))
        np.add.at(counts, (prev[:, k], x[:, k]), 1)
        np.add.at(expected, prev[:, k], q[:, k])
        pvalues.append(chi2_pvalue(counts, expected / samples))
    return pvalues


@pytest.mark.slow
def test_drafts_follow_the_reported_q(pair):
    target, drafter = pair
    pvalues = drafts_pvalues(target, drafter, SETTINGS["t0.8-all"], samples=DRAFT_SAMPLES)
    assert min(pvalues) > ALPHA / len(pvalues), pvalues


def test_drafter_check_rejects_a_misreported_q(pair):
    # A drafter that reports slot 0's distribution for every slot (e.g. a Markov correction
    # dropped from q) must fail the same check.
    target, drafter = pair

    def first_row_everywhere(p: Proposal) -> Proposal:
        return Proposal(p.tokens, mx.broadcast_to(p.q[:1], p.q.shape))

    wrong = first_row_everywhere
    pvalues = drafts_pvalues(target, drafter, SETTINGS["t0.8-all"], DRAFT_SAMPLES, wrap=wrong)
    assert min(pvalues) < ALPHA / len(pvalues), pvalues


# ----------------------------------------------------------------------------- the real loop
@contextmanager
def confidence_cut(drafter: Drafter, threshold: float) -> Iterator[None]:
    """The confidence cut is the drafter's own (DSpark's; the others have none): `threshold`
    for the duration, then the drafter's own again."""
    if not hasattr(drafter, "confidence_threshold"):
        yield
        return
    own, drafter.confidence_threshold = drafter.confidence_threshold, threshold
    try:
        yield
    finally:
        drafter.confidence_threshold = own


def loop_pvalue(
    target: Target,
    drafter: Drafter,
    params: SamplingParams,
    *,
    tokens: int,
    runs: int = 20,
    max_draft: int | None = None,
    confidence_threshold: float = 0.0,
    seed: int = 0,
) -> tuple[float, list[Round]]:
    """`runs` real `speculate` runs (random prompts, `tokens` in all), checked token by token.

    Each emitted token y_j must be a draw from p_j = the target's law after everything before
    it (read off one forward over prompt + output). Counts of (y_{j-1}, y_j) are compared with
    the sums of 1[y_{j-1} = a] * p_j(b); drafters prefer tokens, so a loop that leaks the
    drafter's law shows in these cells. Several short runs visit many states (a tiny random
    model settles into a loop in one long run). Returns (p-value, rounds). Any (target, drafter).
    """
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)  # once: a seed in params would make every run identical
    rounds: list[Round] = []
    counts, expected = np.zeros((V, V)), np.zeros((V, V))
    for _ in range(runs):
        prompt = rng.integers(0, V, rng.integers(1, 5)).tolist()
        out: list[int] = []
        with confidence_cut(drafter, confidence_threshold):
            for step in speculate(
                target,
                drafter,
                prompt,
                max_new_tokens=tokens // runs,
                max_draft=max_draft,
                params=params,
            ):
                out += step.tokens
                rounds += [step.round] if step.round is not None else []
        logits = target.model(mx.array([prompt + out[:-1]]))[0, len(prompt) - 1 :]
        p = np.array(probs(logits, params), np.float64)
        y, prev = np.array(out), np.array(prompt[-1:] + out[:-1])
        if (p[np.arange(len(y)), y] <= 0).any():
            return 0.0, rounds  # a token the truncated target law forbids
        np.add.at(counts, (prev, y), 1)
        np.add.at(expected, prev, p)
    return chi2_pvalue(counts, expected / counts.sum()), rounds


LOOP_TOKENS = 1_000  # a broken verify gives p < 1e-9 here


@pytest.mark.slow
@pytest.mark.parametrize("setting,max_draft,confidence", [("t0.8-all", None, 0.5), ("t1", 2, 0.0)])
def test_real_loop_follows_the_target_law(pair, setting, max_draft, confidence):
    target, drafter = pair
    pvalue, rounds = loop_pvalue(
        target,
        drafter,
        SETTINGS[setting],
        tokens=LOOP_TOKENS,
        max_draft=max_draft,
        confidence_threshold=confidence,
    )
    assert pvalue > ALPHA, f"p-value {pvalue:.2e}"
    # Not vacuous: rejections (residual draws), runs of accepted drafts, bonus tokens.
    assert any(r.accepted < len(r.proposed) for r in rounds)
    assert any(r.accepted >= 2 for r in rounds)
    assert any(r.accepted == len(r.proposed) > 0 for r in rounds)


@pytest.mark.slow
def test_real_loop_check_rejects_a_broken_verify(monkeypatch):
    target = tiny_target()
    drafter = DRAFTERS["dspark-markov"](target)
    monkeypatch.setattr(speculate_module, "verify", broken_no_residual)
    pvalue, _ = loop_pvalue(target, drafter, SETTINGS["t0.8-all"], tokens=LOOP_TOKENS)
    assert pvalue < ALPHA, f"broken loop passed: p-value {pvalue:.2e}"


# ----------------------------------------------------------------------------- probs vs mlx-lm
def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """mlx-lm's filters as documented, in numpy: on the untempered distribution keep a token if
    the mass strictly above it is < top_p, if its probability is >= min_p * the top one, and if
    it is among the top_k; then renormalize exp(logprob / temperature) over the kept tokens."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keep = np.ones_like(p, bool)
    above = (p[..., None, :] * (p[..., None, :] > p[..., :, None])).sum(-1)
    keep &= above < params.top_p
    keep &= p >= params.min_p * p.max(-1, keepdims=True)
    if params.top_k:
        rank = (p[..., None, :] > p[..., :, None]).sum(-1)
        keep &= rank < params.top_k
    z = np.where(keep, np.log(p) / params.temperature, -np.inf)
    out = np.exp(z - z.max(-1, keepdims=True))
    return out / out.sum(-1, keepdims=True)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_probs_matches_mlx_lm_filters(setting):
    params = SETTINGS[setting]
    logits = np.random.default_rng(1).normal(0, 2, (64, 11)).astype(np.float32)
    got = np.array(probs(mx.array(logits), params))
    np.testing.assert_allclose(got, reference_probs(logits.astype(np.float64), params), atol=2e-6)


def test_mlx_lm_sampler_draws_from_probs():
    # What the speculative output is compared with is what plain mlx-lm decoding samples from.
    params = SETTINGS["t0.8-all"]
    logits = mx.array(np.random.default_rng(2).normal(0, 2, (1, 11)), mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.random.seed(3)
    sampler = make_sampler(params.temperature, params.top_p, params.min_p, top_k=params.top_k)
    draws = np.array(sampler(mx.broadcast_to(logprobs, (30_000, 11))))
    law = np.array(probs(logits, params))[0]
    assert chi2_pvalue(np.bincount(draws, minlength=11), law) > ALPHA


# ----------------------------------------------------------------------------- verify details
def test_verify_batched_equals_one_row_at_a_time():
    # The loop calls verify without batch axes; the kernel check calls it with one. Same keys ->
    # same draws, row by row, when the batch is a single row.
    rng = np.random.default_rng(4)
    params = SETTINGS["t0.8-all"]
    q = probs(mx.array(rng.normal(0, 2, (3, V)), mx.float32), params)
    logits = mx.array(rng.normal(0, 2, (4, V)), mx.float32)
    draft = mx.array([1, 2, 0], mx.int32)
    for seed in range(20):
        mx.random.seed(seed)
        one = verify(draft, q, logits, params)
        mx.random.seed(seed)
        batched = verify(draft[None], q[None], logits[None], params)
        assert [int(v) for v in one] == [int(v[0]) for v in batched]


def test_verify_edge_cases():
    params = SamplingParams(1.0, top_k=2)
    logits = mx.array([[0.0, 5.0, 4.0, -3.0, -3.0], [9.0, 1.0, 0.0, 0.0, 0.0]])
    # q == p on the draft: always accepted, and the bonus comes from the next row's p.
    p0 = probs(logits[:1], params)
    for seed in range(10):
        mx.random.seed(seed)
        draft = draw(p0).astype(mx.int32)
        accepted, token = verify(draft, p0, logits, params)
        assert int(accepted) == 1 and int(token) in (0, 1)  # row 1's top 2
    # A draft outside the target's top-k is always rejected; the correction never returns it.
    q = mx.array([[0.0, 0.0, 0.0, 1.0, 0.0]])
    for seed in range(10):
        mx.random.seed(seed)
        accepted, token = verify(mx.array([3], mx.int32), q, logits, params)
        assert int(accepted) == 0 and int(token) in (1, 2)
    # No drafts (a plain target step), sampled and greedy.
    empty = mx.zeros((0,), mx.int32)
    accepted, token = verify(empty, None, logits[:1], params)
    assert int(accepted) == 0 and int(token) in (1, 2)
    assert [int(v) for v in verify(empty, None, logits[:1], SamplingParams())] == [0, 1]


# ----------------------------------------------------------------------------- determinism, greedy
def test_same_seed_same_output(qwen3_fixture_pair):
    target, tokenizer, drafter, _ = qwen3_fixture_pair
    kw = dict(max_new_tokens=40, temperature=0.9, top_p=0.95, top_k=50, min_p=0.02)
    runs = [
        speculative_generate(target, tokenizer, drafter, "Tell me a story", seed=s, **kw)
        for s in (7, 7, 8)
    ]
    assert runs[0].tokens == runs[1].tokens
    # The seed fixes the whole run, round structure included, not just the text.
    assert [r.proposed for r in runs[0].rounds] == [r.proposed for r in runs[1].rounds]
    assert runs[0].tokens != runs[2].tokens  # and it is really used


def test_temperature_zero_is_exactly_greedy(qwen3_fixture_pair):
    target, tokenizer, drafter, _ = qwen3_fixture_pair
    prompt = [51, 258, 220, 22, 340]
    want = [int(t) for t, _ in generate_step(mx.array(prompt), target.model, max_tokens=32)]
    for temperature in (0.0, 1e-6):  # below GREEDY_TEMPERATURE is greedy too
        params = SamplingParams(temperature, top_p=0.5, top_k=3, seed=1)  # filters can't matter
        got = [
            t
            for s in speculate(target, drafter, prompt, max_new_tokens=32, params=params)
            for t in s.tokens
        ]
        assert got == want, temperature
    assert int(sample(mx.array([[0.1, 2.0, 0.3]]), SamplingParams())[0]) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(top_k=True),
        dict(min_p=-0.1),
        dict(min_p=1.0),
    ],
)
def test_bad_sampling_settings_raise(kwargs, qwen3_fixture_pair):
    with pytest.raises(SpecDecError):
        SamplingParams(**kwargs)
    target, tokenizer, drafter, _ = qwen3_fixture_pair
    with pytest.raises(SpecDecError):
        speculative_generate(target, tokenizer, drafter, "hi", max_new_tokens=2, **kwargs)


def test_numpy_top_k_is_accepted_as_int():
    params = SamplingParams(1.0, top_k=np.int64(2))
    assert type(params.top_k) is int
    assert int((np.array(probs(mx.array([[1.0, 2.0, 3.0]]), params)) > 0).sum()) == 2


def test_replace_keeps_validation():
    with pytest.raises(SpecDecError):
        replace(SamplingParams(1.0), top_p=2.0)
