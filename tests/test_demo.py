"""The embedded demo pair: it ships with the package (at most 25 MB), loads offline with no
model named, and is lossless for both of its drafters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.nn as nn
import pytest

from mlx_specdec import baseline_generate, load_pair, speculative_generate
from mlx_specdec.demo import DEMO_DIR, draft_lm_path

PROMPTS = [json.loads(line) for line in (DEMO_DIR / "prompts.jsonl").read_text().splitlines()]


def test_demo_ships_whole_and_small():
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for part in ("target", "dspark", "dflash", "draft-lm"):
        assert (DEMO_DIR / part / "model.safetensors").is_file(), part
    assert (DEMO_DIR / "target" / "tokenizer.json").is_file()
    assert {p["domain"] for p in PROMPTS} == {"code", "prose", "math"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dspark", "dflash"])
def test_demo_pair_loads_offline_and_is_lossless(monkeypatch, mode):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target, tokenizer, drafter, config = load_pair(mode=mode)
    # The DFlash drafter is in DeepSpec's layout: the DSpark class without a Markov head.
    assert config.drafter == str(DEMO_DIR / mode) and config.target == str(DEMO_DIR / "target")
    for domain in ("code", "prose", "math"):
        prompt = next(p["prompt"] for p in PROMPTS if p["domain"] == domain)
        want = baseline_generate(target, tokenizer, prompt, max_new_tokens=48).tokens
        for cap in (None, 2):
            got = speculative_generate(
                target, tokenizer, drafter, prompt, max_new_tokens=48, max_draft=cap
            )
            assert got.tokens == want, (domain, cap)


def test_draft_lm_is_a_plain_mlx_lm_model():
    from mlx_lm import load

    model, tokenizer = load(draft_lm_path())
    assert tokenizer.vocab_size == load_pair(mode="baseline")[1].vocab_size


def test_generate_with_no_model_runs_the_demo():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "mlx_specdec", "generate", "--prompt", "def quicksort(arr):",
         "--max-new-tokens", "24", "--max-draft", "3", "--compare"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "[dspark] 24 tokens" in out.stdout and "outputs identical" in out.stdout


def _code_accept(target, tokenizer, drafter) -> float:
    prompts = [p["prompt"] for p in PROMPTS if p["domain"] == "code"][:6]
    rounds = [r for p in prompts for r in speculative_generate(
        target, tokenizer, drafter, p, max_new_tokens=64).rounds]  # fmt: skip
    return sum(len(r.committed) for r in rounds) / len(rounds)


@pytest.mark.slow
def test_demo_dspark_keeps_its_acceptance(monkeypatch):
    """A floor under the shipped DSpark drafter's greedy accept length on held-out code: a broken
    drafter layer keeps the output lossless (the target decides every token) but sinks this, as
    a RoPE with the wrong frequencies shows."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target, tokenizer, drafter, _ = load_pair(mode="dspark", drafter_bits=32)
    assert _code_accept(target, tokenizer, drafter) >= 2.7
    shape = drafter.config.shape
    for layer in drafter.layers:  # positions read 3x too fast
        wrong = nn.RoPE(shape.head_dim, traditional=False, base=shape.rope_theta, scale=3.0)
        monkeypatch.setattr(layer.self_attn, "rope", wrong)
    assert _code_accept(target, tokenizer, drafter) < 2.7
