"""Speculative sampling stays exact on a hybrid target: the real loop over a tiny random Qwen3.5
(Gated DeltaNet and attention layers, a 5-token vocabulary) emits every token from the target's
own law after exactly the tokens before it, while rounds keep random numbers of drafts and roll
the recurrent layers back at every depth. The method and the statistics are those of
`test_sampling.py` (its check 3, whose chi-square helper this reuses), plus a rank check that
sees a wrong recurrent state (its power is on record: a broken rollback fails it)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import build_drafter, build_model, dspark_config, target_config
from hybrid_models import qwen3_5_config
from mlx.utils import tree_map_with_path
from test_sampling import ALPHA, SETTINGS, chi2_pvalue

from mlx_specdec import speculate
from mlx_specdec.recurrent import RecurrentCache
from mlx_specdec.sampling import probs
from mlx_specdec.target import Target

V = 5
BLOCK = 4
RECURRENT_GAIN = 4.0
MEMORY = -1.0  # A_log: decay exp(-0.37 * softplus(.)) a step


def tiny_hybrid() -> tuple[Target, object]:
    config = qwen3_5_config()
    config["text_config"].update(vocab_size=V, hidden_size=32, num_hidden_layers=3)
    model = build_model(config, seed=0)
    # Sharpen the random head: peaky distributions make truncation and rejection matter. And
    # louden the Gated DeltaNet layers, so a state that kept rejected drafts shows in the law.
    head = model.language_model.lm_head
    head.weight = head.weight * 1.5

    def louder(path: str, w: mx.array) -> mx.array:
        if path.endswith("A_log"):  # a slow decay: the state remembers (mlx-lm's init forgets)
            return mx.full(w.shape, MEMORY, w.dtype)
        return w * RECURRENT_GAIN if "linear_attn.out_proj" in path else w

    model.update(tree_map_with_path(louder, model.parameters()))
    mx.eval(model.parameters())
    target = Target(model, config, name="tiny qwen3_5")
    base = target_config(layers=3, hidden_size=32, vocab_size=V, intermediate_size=64)
    drafter_config = dspark_config(
        base, 4, num_hidden_layers=1, block_size=BLOCK, mask_token_id=V - 1, target_layer_ids=[0, 1]
    )
    drafter = build_drafter(drafter_config, seed=1)
    drafter.markov_head.markov_w2.weight = drafter.markov_head.markov_w2.weight * 6
    mx.eval(drafter.parameters())
    target.set_taps(drafter.tap_ids)
    return target, drafter


def loop_pvalues(target, drafter, params, max_draft, runs=20, tokens=40):
    """`runs` real `speculate` runs from random prompts, every emitted token y_j checked against
    p_j, the target's law after everything before it (one forward over the output). Two
    chi-square checks: counts of (y_{j-1}, y_j) against the sums of 1[y_{j-1} = a] p_j(b), as
    in `test_sampling.py` (a loop leaking the drafter's law shows there), and counts of y_j's
    rank under p_j against the sums of p_j's sorted probabilities (a wrong recurrent state
    draws from another law, which ranks the target's likely tokens lower). Returns the two
    p-values (0 for a token the truncated law forbids) and the rounds."""
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    pairs, pairs_law = np.zeros((V, V)), np.zeros((V, V))
    ranks, ranks_law = np.zeros(V), np.zeros(V)
    rounds = []
    for _ in range(runs):
        prompt = rng.integers(0, V, rng.integers(1, 5)).tolist()
        out: list[int] = []
        for step in speculate(
            target, drafter, prompt, max_new_tokens=tokens, max_draft=max_draft, params=params
        ):
            out += step.tokens
            rounds += [step.round] if step.round is not None else []
        logits = target.model(mx.array([prompt + out[:-1]]))[0, len(prompt) - 1 :]
        p = np.array(probs(logits, params), np.float64)
        y, prev = np.array(out), np.array(prompt[-1:] + out[:-1])
        if (p[np.arange(len(y)), y] <= 0).any():
            return (0.0, 0.0), rounds
        np.add.at(pairs, (prev, y), 1)
        np.add.at(pairs_law, prev, p)
        order = np.argsort(-p, axis=1, kind="stable")
        np.add.at(ranks, np.argmax(order == y[:, None], axis=1), 1)
        ranks_law += np.take_along_axis(p, order, axis=1).sum(axis=0)
    n = pairs.sum()
    return (chi2_pvalue(pairs, pairs_law / n), chi2_pvalue(ranks, ranks_law / n)), rounds


@pytest.mark.slow
@pytest.mark.parametrize("setting,max_draft", [("t0.8-all", None), ("t1", 2)])
def test_hybrid_loop_follows_the_target_law(setting, max_draft):
    target, drafter = tiny_hybrid()
    pvalues, rounds = loop_pvalues(target, drafter, SETTINGS[setting], max_draft)
    assert min(pvalues) > ALPHA / 2, f"p-values {pvalues}"
    # Not vacuous: rejections (rolled back), runs of accepted drafts, bonus tokens.
    assert any(0 < r.accepted < len(r.proposed) for r in rounds)
    assert any(r.accepted >= 2 for r in rounds)
    assert any(r.accepted == len(r.proposed) > 0 for r in rounds)


@pytest.mark.slow
def test_the_check_rejects_a_state_that_kept_rejected_drafts(monkeypatch):
    """The check's power on record: a rollback that restores the conv window but leaves the
    delta-rule state after all verified positions must fail it."""
    exact = RecurrentCache.rollback

    def keeps_rejected(self, n):
        after_all = self[1] if len(self.cache) > 1 else None
        exact(self, n)
        if n > 0 and after_all is not None:
            self[1] = after_all

    monkeypatch.setattr(RecurrentCache, "rollback", keeps_rejected)
    target, drafter = tiny_hybrid()
    pvalues, _ = loop_pvalues(target, drafter, SETTINGS["t1"], 2)
    assert min(pvalues) < ALPHA / 2, f"broken rollback passed: p-values {pvalues}"
