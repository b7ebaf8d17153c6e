"""The CLI as users run it: real subprocesses, real files, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import FIXTURES

PAIR = FIXTURES / "dspark_qwen3"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """The draft-cap cache of every CLI run here lives in a temporary folder, never ~/.cache."""
    monkeypatch.setenv("MLX_SPECDEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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


def test_max_draft_auto_is_the_default_measured_once_then_cached(_private_cache):
    args = ("generate", "--model", str(PAIR / "target"), "--drafter", str(PAIR / "drafter"))
    args += ("--prompt", "The 7th", "--no-chat", "--max-new-tokens", "20")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "calibrating the draft cap" in first.stderr and "--max-draft N skips it" in first.stderr
    cap = int(re.search(r"\[auto\] --max-draft (\d+) \(of 7; measured", first.stderr).group(1))
    assert 1 <= cap <= 7
    (entry,) = json.loads((_private_cache / "max_draft.json").read_text())["entries"].items()
    key, value = entry
    assert key.startswith(str((PAIR / "target").resolve())) and value["cap"] == cap

    again = cli(*args, "--max-draft", "auto")  # the explicit flag means the same
    assert again.returncode == 0, again.stderr
    assert "calibrating" not in again.stderr
    assert f"[auto] --max-draft {cap} (of 7; cached" in again.stderr
    assert again.stdout.splitlines()[0] == first.stdout.splitlines()[0]

    for flag in ("0", "3"):  # a given cap (0 = the full block) neither measures nor reports
        fixed = cli(*args, "--max-draft", flag)
        assert fixed.returncode == 0, fixed.stderr
        assert "--max-draft" not in fixed.stderr
        assert fixed.stdout.splitlines()[0] == first.stdout.splitlines()[0]


def test_max_draft_flag_values():
    from mlx_specdec.cli import build_parser

    parser = build_parser("generate")
    base = ["generate", "--prompt", "x"]
    assert parser.parse_args(base).max_draft == "auto"
    assert parser.parse_args([*base, "--max-draft", "0"]).max_draft is None
    assert parser.parse_args([*base, "--max-draft", "4"]).max_draft == 4
    serve = build_parser("serve")
    assert serve.parse_args(["serve", "--max-draft", "auto"]).max_draft == "auto"
    assert serve.parse_args(["serve"]).max_draft == "auto"  # as generate
    bad = cli("generate", "--prompt", "x", "--max-draft", "many")
    assert bad.returncode == 2 and "takes an integer (0 = full block) or 'auto'" in bad.stderr


def test_openblas_env_preloads_once_and_respects_the_user():
    from mlx_specdec.cli import openblas_env

    lib = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    env = openblas_env({"PATH": "/bin"}, lib)
    assert env == {"PATH": "/bin", "LD_PRELOAD": lib, "OPENBLAS_NUM_THREADS": "1"}
    kept = openblas_env({"LD_PRELOAD": "/x/libfoo.so", "OPENBLAS_NUM_THREADS": "2"}, lib)
    assert kept["LD_PRELOAD"] == f"{lib}:/x/libfoo.so" and kept["OPENBLAS_NUM_THREADS"] == "2"
    assert openblas_env({}, None) is None  # none on this system
    assert openblas_env({"LD_PRELOAD": lib}, lib) is None  # already there: no restart loop
    assert openblas_env({"MLX_SPECDEC_OPENBLAS": "0"}, lib) is None


def _linux_cpu_with_openblas() -> bool:
    import platform

    import mlx.core as mx

    from mlx_specdec.cli import system_openblas

    on_cpu = platform.system() == "Linux" and mx.default_device() == mx.cpu
    return on_cpu and system_openblas() is not None


@pytest.mark.skipif(not _linux_cpu_with_openblas(), reason="needs a Linux CPU with OpenBLAS")
@pytest.mark.parametrize("switch", ["on", "off"])
def test_generate_restarts_itself_with_the_system_openblas(switch, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    if switch == "off":
        monkeypatch.setenv("MLX_SPECDEC_OPENBLAS", "0")
    pair = ["--model", str(PAIR / "target"), "--drafter", str(PAIR / "drafter")]
    out = cli("generate", *pair, "--prompt", "The 7th", "--no-chat", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    # The restarted process saw the preload: it says it restarted, once, and gives no note.
    assert ("MLX's bundled BLAS makes verifying" in out.stderr) == (switch == "off")
    assert out.stderr.count("restarted with OpenBLAS preloaded") == (switch == "on")


def test_blas_line_says_the_restart_or_the_bundled_blas(monkeypatch):
    from mlx_specdec import cli as cli_module

    if not cli_module._on_linux_cpu():
        pytest.skip("the BLAS line is for Linux CPUs")
    monkeypatch.setenv(cli_module.RESTARTED, "/lib/libopenblas.so.0")
    assert cli_module.blas_line() == (
        "mlx-specdec: restarted with OpenBLAS preloaded (/lib/libopenblas.so.0); "
        "MLX_SPECDEC_OPENBLAS=0 turns this off"
    )
    monkeypatch.delenv(cli_module.RESTARTED)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert "bundled BLAS" in cli_module.blas_line()
    monkeypatch.setenv("LD_PRELOAD", "/lib/libopenblas.so.0")  # preloaded by the user: silent
    assert cli_module.blas_line() is None


def test_a_failing_command_says_one_line_even_when_restarted(tmp_path):
    """The restart line is said once the pair has loaded, so an error stays one line."""
    out = cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr


def test_models_imports_the_registry_and_no_subcommand_module():
    code = (
        "import sys; from mlx_specdec.cli import main; main(['models']); "
        "print(sorted(m for m in sys.modules if m.startswith('mlx_specdec.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip().splitlines()[-1]
    assert "mlx_specdec.registry" in loaded
    for heavy in ("bench", "server", "train"):  # the subcommand packages
        assert f"mlx_specdec.{heavy}" not in loaded, loaded
