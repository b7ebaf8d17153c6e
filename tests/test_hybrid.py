"""Lossless greedy on hybrid and MoE targets: the verify loop gives token for token what plain
mlx-lm decoding gives, for DSpark, DFlash and EAGLE3 drafters, on tiny random instances of every
model type in `hybrid_models.HYBRID_TARGETS` (Qwen3.5 / Qwen3.5-MoE / Qwen3-Next Gated DeltaNet,
Nemotron-H Mamba-2, LFM2 / LFM2-MoE short convolutions, attention-only Qwen3-MoE).

Random drafters are never right, so each is `Steered`: its drafts are replaced by the target's
own continuation for a random number of slots, and rounds accept 0..n drafts, which rolls the
recurrent layers back at every depth. The states themselves: `test_hybrid_rollback.py`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers import greedy_reference, run, write_drafter
from hybrid_models import HYBRID_TARGETS, Steered, drafter_configs, write_hybrid

from mlx_specdec import load_pair, recurrent

KINDS = ("dspark", "dflash", "eagle3")


@pytest.fixture(scope="module", params=list(HYBRID_TARGETS))
def folders(request, tmp_path_factory) -> tuple[str, Path, dict[str, Path]]:
    """(model type, target folder, kind -> drafter folder)."""
    root = tmp_path_factory.mktemp(request.param)
    config = HYBRID_TARGETS[request.param]()
    target = write_hybrid(root / "target", config, seed=3)
    drafters = {
        kind: write_drafter(root / kind, cfg, seed=5)
        for kind, cfg in drafter_configs(config).items()
    }
    return request.param, target, drafters


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 490) for _ in range(length)]


def _check(target, drafter, prompt, max_new, caps, eos=(), seed=0):
    """Every cap gives plain greedy decoding's tokens, with rounds that really roll back."""
    want = greedy_reference(target.model, prompt, max_new + drafter.max_draft + 1, set(eos))
    cut = want[:max_new]
    if eos and set(eos) & set(cut):
        cut = cut[: next(i for i, t in enumerate(cut) if t in eos) + 1]
    partial = 0
    for cap in caps:
        steered = Steered(drafter, len(prompt), want, seed=seed + cap)
        got, rounds = run(target, steered, prompt, max_new, eos, max_draft=cap)
        assert got == cut, (len(prompt), cap)
        assert got[1:] == [t for r in rounds for t in r.committed]
        partial += sum(0 < r.accepted < len(r.proposed) for r in rounds)
    return partial


@pytest.mark.parametrize("kind", KINDS)
def test_matches_mlx_lm_greedy(folders, kind):
    """Each drafter family (Gated DeltaNet kept per position, as on CPUs and CUDA)."""
    model_type, target_dir, drafters = folders
    target, _, drafter, _ = load_pair(str(target_dir), str(drafters[kind]), drafter_bits=32)
    assert target.model_type == model_type
    partial = 0
    for length in (1, 33):
        partial += _check(target, drafter, _prompt(length, length), 20, (1, drafter.max_draft))
    assert partial > 0  # rounds that kept some drafts and rolled back the rest


def test_replayed_rollback_matches_mlx_lm_greedy(folders, monkeypatch):
    """Gated DeltaNet rolled back by replaying its update (as on Metal), forced here."""
    if not folders[0].startswith("qwen3_") or folders[0] == "qwen3_moe":
        pytest.skip("no Gated DeltaNet layer")
    monkeypatch.setattr(recurrent, "REPLAY", True)
    test_matches_mlx_lm_greedy(folders, "dspark")


@pytest.mark.slow
def test_every_cap_and_prompt_length(folders):
    model_type, target_dir, drafters = folders
    target, _, drafter, _ = load_pair(str(target_dir), str(drafters["dspark"]), drafter_bits=32)
    for length in (1, 2, 7, 33, 200):
        _check(target, drafter, _prompt(length, 7 * length), 24, range(1, drafter.max_draft + 1))


def test_budget_and_stop_token_inside_a_round(folders):
    model_type, target_dir, drafters = folders
    target, _, drafter, _ = load_pair(str(target_dir), str(drafters["dspark"]), drafter_bits=32)
    prompt = _prompt(9, 1)
    want = greedy_reference(target.model, prompt, 48, set())
    for max_new in (1, 2, 5, 9, 23):  # budgets that end inside accepted runs
        steered = Steered(drafter, len(prompt), want, p=0.95)
        got, rounds = run(target, steered, prompt, max_new)
        assert got == want[:max_new]
        assert sum(len(r.committed) for r in rounds) == max_new - 1
    # A stop token inside an accepted run of drafts (its first occurrence): generation ends on
    # it, with no bonus after it.
    pos, stop = _stop_inside_a_round(target, drafter, prompt, want)
    got, got_rounds = run(target, Steered(drafter, len(prompt), want, p=1.0), prompt, 30, {stop})
    assert got == want[: pos + 1] == greedy_reference(target.model, prompt, 30, {stop})
    assert got_rounds[-1].committed[-1] == stop


def _stop_inside_a_round(target, drafter, prompt, want) -> tuple[int, int]:
    """(position, token) of a draft accepted mid-round, not first in its round, seen first."""
    _, rounds = run(target, Steered(drafter, len(prompt), want, p=1.0), prompt, 30)
    pos = 1
    for r in rounds:
        for i in range(1, r.accepted):
            if want[pos + i] not in want[: pos + i]:
                return pos + i, want[pos + i]
        pos += len(r.committed)
    pytest.fail("no token occurs first inside a round: pick another prompt")
