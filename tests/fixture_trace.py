"""Running the verify loop on a conformance fixture and comparing it with the reference trace,
and damaged copies of a fixture's drafter (shared by the DFlash, EAGLE3 and Gemma-4 tests)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from mlx_specdec import speculate
from mlx_specdec.sampling import SamplingParams, probs
from mlx_specdec.speculate import Round


def load_reference(fixture: Path) -> tuple[dict, dict[str, mx.array]]:
    return json.loads((fixture / "reference.json").read_text()), mx.load(
        str(fixture / "reference.safetensors")
    )


def run(target, drafter, prompt, max_new, eos=(), **kw) -> tuple[list[int], list[Round]]:
    tokens, rounds = [], []
    for step in speculate(target, drafter, prompt, max_new_tokens=max_new, eos_ids=set(eos), **kw):
        tokens += step.tokens
        if step.round is not None:
            rounds.append(step.round)
    return tokens, rounds


def check_trace(rounds: list[Round], reference: list[dict]) -> int:
    """Our rounds against the reference's, in every round it marks trace_robust: the same drafts
    up to the first rejection, the same acceptance and the same committed tokens. (In the last
    round we may draft fewer: our loop never drafts past the budget, the reference drafts and then
    clamps.) Returns how many rounds were compared."""
    assert len(rounds) == len(reference)
    compared = 0
    for ours, ref in zip(rounds, reference):
        if not ref["trace_robust"]:
            break
        a = ref["accepted_draft_tokens"]
        upto = min(a + 1, len(ours.proposed))
        assert ours.proposed[:upto] == ref["proposed_tokens"][:upto], ref["round"]
        assert ours.accepted == min(a, len(ours.proposed)), ref["round"]
        assert ours.committed == ref["committed_tokens"], ref["round"]
        compared += 1
    return compared


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def check_distributions(
    logits: mx.array, reference: dict[str, mx.array], params: SamplingParams, tolerance: float
) -> None:
    """Temperature-1 round 0: our draft logits are within `tolerance` of the reference's, `probs`
    turns the reference's logits into its q exactly, and our q rows are distributions close to
    the reference's (bf16 logit noise of ~0.5 moves flat rows by up to ~0.11 in total variation)."""
    assert max_diff(logits, reference["logits"]) < tolerance
    assert max_diff(probs(reference["logits"], params), reference["q"]) < 1e-4
    q = probs(logits, params)
    assert mx.allclose(q.sum(axis=-1), mx.ones(q.shape[0]), atol=1e-5)
    assert 0.5 * mx.abs(q - reference["q"]).sum(axis=-1).max().item() < 0.15


def broken_drafter(
    fixture: Path,
    tmp_path: Path,
    config_change: Callable[[dict], None] | None = None,
    drop_tensor: str | None = None,
) -> str:
    """A copy of the fixture's drafter with its config edited or one tensor removed."""
    path = tmp_path / "drafter"
    shutil.copytree(fixture / "drafter", path)
    if config_change:
        config = json.loads((path / "config.json").read_text())
        config_change(config)
        (path / "config.json").write_text(json.dumps(config))
    if drop_tensor:
        weights = mx.load(str(path / "model.safetensors"))
        del weights[drop_tensor]
        mx.save_safetensors(str(path / "model.safetensors"), weights)
    return str(path)
