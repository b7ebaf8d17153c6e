"""`serve --sharding` (`mlx_specdec/server/sharded.py`): rank 0 answers with what a
single-process run gives, a client that leaves mid-stream stops every rank at the same round
(the next request still matches), and stopping rank 0 ends the followers."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest
from helpers import write_drafter
from hybrid_models import drafter_configs, qwen3_moe_config, write_hybrid
from test_distributed_faults import start

from mlx_specdec.bench.link import free_ports
from mlx_specdec.generate import speculative_generate
from mlx_specdec.loading import load_pair

pytestmark = pytest.mark.slow


def _wait_ready(url: str, ranks: list[subprocess.Popen], timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert all(p.poll() is None for p in ranks), "a rank ended before serving"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail("the server did not come up")


def test_serve_split_answers_as_one_process_and_stops_cleanly(tmp_path):
    config = qwen3_moe_config()
    target = str(write_hybrid(tmp_path / "target", config))
    drafter = str(write_drafter(tmp_path / "drafter", drafter_configs(config)["dspark"]))
    pair = load_pair(target, drafter, drafter_bits=32)
    want = speculative_generate(*pair[:3], "hello there", chat=False, max_new_tokens=16).text

    port = free_ports(1)
    args = ["serve", "--sharding", "pipeline", "--model", target, "--drafter", drafter]
    args += ["--port", str(port), "--max-draft", "3", "--drafter-bits", "32"]
    ranks = start(tmp_path, [args, args])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, ranks)
        request = {"model": "m", "prompt": "hello there", "max_tokens": 16, "temperature": 0}
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/completions", json=request).json()["choices"][0]["text"] == want
            streamed = {**request, "max_tokens": 400, "stream": True}
            with client.stream("POST", "/v1/completions", json=streamed) as r:
                for n, _ in enumerate(line for line in r.iter_lines() if line.startswith("data:")):
                    if n == 2:
                        break  # the client leaves: every rank stops at the same round
            sampled = {**request, "temperature": 0.8}  # no seed: rank 0 draws one for all
            assert client.post("/v1/completions", json=sampled).status_code == 200
            assert client.post("/v1/completions", json=request).json()["choices"][0]["text"] == want
        ranks[0].send_signal(signal.SIGTERM)  # uvicorn ends by the signal once drained
        assert ranks[0].wait(timeout=30) == -signal.SIGTERM
        assert ranks[1].wait(timeout=30) == 0
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
