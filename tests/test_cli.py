"""The CLI as users run it: real subprocesses, real files, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import FIXTURES

PAIR = FIXTURES / "dspark_qwen3"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mlx_specdec", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_generate_compare_streams_and_is_identical():
    out = cli(
        "generate",
        "--model",
        str(PAIR / "target"),
        "--drafter",
        str(PAIR / "drafter"),
        "--prompt",
        "The 7th",
        "--no-chat",
        "--max-new-tokens",
        "30",
        "--compare",
    )
    assert out.returncode == 0, out.stderr
    assert "and 8th grades" in out.stdout  # the fixture target's memorised continuation
    assert "[dspark] 30 tokens, mean accept length" in out.stdout
    assert "[baseline] 30 tokens" in out.stdout
    assert "outputs identical" in out.stdout
    assert "[auto] dspark drafter" in out.stderr


def test_baseline_mode_and_models_table():
    out = cli(
        "generate",
        "--model",
        str(PAIR / "target"),
        "--mode",
        "baseline",
        "--prompt",
        "The 7th",
        "--no-chat",
        "--max-new-tokens",
        "5",
    )
    assert out.returncode == 0, out.stderr
    assert "[baseline] 5 tokens" in out.stdout
    table = cli("models")
    assert table.returncode == 0
    assert "deepseek-ai/dspark_qwen3_4b_block7" in table.stdout


def test_bad_input_is_one_line_without_traceback():
    cases = [
        ("generate", "--model", "/no/such/dir", "--prompt", "x"),
        (
            "generate",
            "--model",
            str(PAIR / "target"),
            "--drafter",
            str(PAIR / "target"),
            "--prompt",
            "x",
        ),
        (
            "generate",
            "--model",
            str(PAIR / "target"),
            "--drafter",
            str(PAIR / "drafter"),
            "--prompt",
            "x",
            "--max-draft",
            "9",
        ),
        (
            "generate",
            "--model",
            str(PAIR / "target"),
            "--drafter",
            str(PAIR / "drafter"),
            "--prompt",
            "x",
            "--top-p",
            "0",
        ),
    ]
    for args in cases:
        out = cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr
        lines = [line for line in out.stderr.splitlines() if line.startswith("mlx-specdec: error:")]
        assert len(lines) == 1, out.stderr
    flag = cli("generate", "--prompt", "x", "--max-new-tokens", "0")
    assert flag.returncode == 2 and "must be >= 1" in flag.stderr
