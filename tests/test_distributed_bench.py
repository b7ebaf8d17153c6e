"""The benchmarks of a split target (`mlx_specdec/bench/split.py`, `bench/link.py`): the link
emulator delays every message by what it is told, and `bench-split` launches the ranks, counts
the collectives each forward makes (tensor: two all-sums per layer, for speculation as for
plain decoding; pipeline: a hop and an all-gather, plus the all-sum of the taps when
speculating) and finds speculation's output identical to plain decoding's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import write_drafter
from hybrid_models import drafter_configs, qwen3_moe_config, write_hybrid
from test_distributed import ENV

from mlx_specdec.bench.link import LinkEmulator


def _echo_server() -> int:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        while data := conn.recv(1024):
            conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def test_the_link_emulator_delays_every_message_both_ways():
    with LinkEmulator(0.02) as link:
        client = socket.create_connection(("127.0.0.1", link.relay(_echo_server())))
        for message in (b"ping", b"pong" * 1000):
            began = time.perf_counter()
            client.sendall(message)
            got = b""
            while len(got) < len(message):
                got += client.recv(65536)
            assert got == message
            assert time.perf_counter() - began >= 0.04  # 20 ms there, 20 ms back
        client.close()


@pytest.mark.slow
def test_bench_split_counts_collectives_and_checks_the_output(tmp_path):
    config = qwen3_moe_config()  # mlx-lm splits Qwen3-MoE both ways
    target = write_hybrid(tmp_path / "target", config)
    drafter = write_drafter(tmp_path / "drafter", drafter_configs(config)["dspark"])
    out = tmp_path / "report.json"
    args = ["bench-split", "--model", str(target), "--drafter", str(drafter), "--prompts", "code"]
    args += ["--link-latency", "0,5", "--limit", "1", "--trials", "1", "--max-new-tokens", "8"]
    args += ["--max-draft", "3", "--json", str(out)]
    env = {**ENV, "MLX_SPECDEC_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_specdec", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    launches = json.loads(out.read_text())["launches"]
    layers = config["num_hidden_layers"]
    for sharding, (plain, verify) in (("tensor", (2 * layers, 2 * layers)), ("pipeline", (2, 3))):
        report = launches[sharding]
        assert report["ranks"] == 2 and report["lossless"]["lossless"] is True
        assert report["lossless"]["compared"] == 3  # both latencies, both modes
        counts = [(r["link_ms"], r["row"], r["collectives_per_forward"]) for r in report["results"]]
        assert counts == [
            ("0", "baseline", plain),
            ("0", "dspark@3", verify),
            ("5", "baseline", plain),
            ("5", "dspark@3", verify),
        ], sharding
        # 5 ms more per message: plain decoding waits for two or more per token (10 ms; the
        # margin is for a loaded machine's noise)
        plain_0, _, plain_5, _ = report["results"]
        assert 1 / plain_5["decode_tps"] - 1 / plain_0["decode_tps"] > 0.005
