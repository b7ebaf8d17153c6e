"""Hybrid targets from the command line, as users run them: `train-drafter` makes a drafter for
a hybrid that has none (taps of Gated DeltaNet / conv / Mamba-2 models), `generate --model
<hybrid folder> --drafter <folder>` and `serve` run it, losslessly."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import greedy_reference
from hybrid_models import HYBRID_TARGETS, write_hybrid

from mlx_specdec.cli import main
from mlx_specdec.generate import encode_prompt, speculative_generate
from mlx_specdec.loading import load_pair


@pytest.fixture(scope="module", params=["qwen3_5", "nemotron_h"])
def trained(request, tmp_path_factory) -> tuple[Path, Path]:
    """A hybrid target folder and a DSpark drafter `train-drafter` made for it (a few steps)."""
    root = tmp_path_factory.mktemp(f"cli_{request.param}")
    target = write_hybrid(root / "target", HYBRID_TARGETS[request.param](), seed=3)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"item {i} is"}) + "\n" for i in range(4)))
    out = root / "drafter"
    args = ["train-drafter", "--model", str(target), "--out", str(out), "--prompts",
            str(prompts), "--steps", "4", "--samples", "4", "--gen-tokens", "24",
            "--batch-size", "2", "--anchors", "4", "--draft-layers", "1", "--markov-rank", "8",
            "--temperature", "0"]  # fmt: skip
    assert main(args) == 0
    return target, out


def test_a_trained_drafter_loads_and_is_lossless(trained):
    target_dir, drafter_dir = trained
    target, tokenizer, drafter, config = load_pair(str(target_dir), str(drafter_dir))
    assert config.drafter_kind == "dspark" and target.recurrent_layers > 0
    tokenizer.eos_token_ids = set()
    ids = encode_prompt(tokenizer, "item 7 is", chat=False)
    r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=20)
    assert r.tokens == greedy_reference(target.model, ids, 20, set())


def test_generate_command_on_a_hybrid_folder(trained, capsys):
    target_dir, drafter_dir = trained
    args = ["generate", "--model", str(target_dir), "--drafter", str(drafter_dir), "--prompt",
            "item 3 is", "--max-new-tokens", "12", "--no-chat", "--compare"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "identical" in out.lower()


@pytest.mark.slow
def test_serve_a_hybrid_with_its_prefix_cache(trained, tmp_path):
    """The server answers a chat twice; the second time from the prefix cache, same text."""
    target_dir, drafter_dir = trained
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mlx_specdec", "serve", "--model", str(target_dir), "--drafter",
           str(drafter_dir), "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        body = {
            "model": "x",
            "messages": [{"role": "user", "content": "item 5 is"}],
            "max_tokens": 12,
            "temperature": 0,
        }
        first = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        again = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        text = first["choices"][0]["message"]["content"]
        assert text == again["choices"][0]["message"]["content"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
