"""`mlx-specdec bench-prefix` end to end on a fixture pair: a table, a JSON report, the
lossless check, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import FIXTURES

PAIR = FIXTURES / "dspark_qwen3"
CMD = [sys.executable, "-m", "mlx_specdec", "bench-prefix", "--model", str(PAIR / "target")]
CMD += ["--drafter", str(PAIR / "drafter"), "--drafter-bits", "16"]


def test_bench_prefix_reports_cold_and_warm(tmp_path):
    out = tmp_path / "prefix.json"
    flags = ["--contexts", "120,300", "--trials", "1", "--max-new-tokens", "4"]
    r = subprocess.run(CMD + flags + ["--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| ~120 |" in r.stdout and "| ~300 |" in r.stdout and "machine:" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    for row, size in zip(rows, (120, 300)):
        assert row["identical"] is True
        assert size <= row["prompt_tokens"] and 0 < row["cached_tokens"] < row["prompt_tokens"]
        assert row["cold_ttft_ms"] > 0 and row["warm_ttft_ms"] > 0
    # The shared part grows with the context; the new tail does not.
    assert rows[1]["prompt_tokens"] - rows[1]["cached_tokens"] < 80


def test_bench_prefix_bad_flags():
    r = subprocess.run(CMD + ["--contexts", "lots"], capture_output=True, text=True)
    assert r.returncode == 2 and "--contexts" in r.stderr and "Traceback" not in r.stderr
