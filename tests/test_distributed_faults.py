"""Faults of a split-target launch: every rank stops with one line, none waits forever.

The ranks are started here rather than by `mlx.launch`, with the environment it gives them
(MLX_RANK, MLX_HOSTFILE of 127.0.0.1 addresses): so that ranks can get different arguments,
report their own exit codes, and be killed or stopped one at a time (`mlx.launch` would stop
the others as soon as one exits).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import dspark_config, target_config, write_drafter, write_target
from test_distributed import ENV

from mlx_specdec.bench.link import free_ports
from mlx_specdec.demo import DEMO_DIR

pytestmark = pytest.mark.slow
ERROR = "mlx-specdec: error: "


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    """A tiny Qwen3 that 2 ranks split evenly, and a random DSpark drafter for it."""
    root = tmp_path_factory.mktemp("faults")
    config = target_config(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    target = write_target(root / "target", config)
    return str(target), str(write_drafter(root / "drafter", dspark_config(config)))


def start(tmp_path: Path, args_of_rank: list[list[str]]) -> list[subprocess.Popen]:
    """One `mlx-specdec` process per rank, joined by the ring backend over 127.0.0.1."""
    first = free_ports(len(args_of_rank))
    hosts = [[f"127.0.0.1:{first + r}"] for r in range(len(args_of_rank))]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps(hosts))
    env = {**ENV, "MLX_HOSTFILE": str(hostfile), "MLX_SPECDEC_CACHE": str(tmp_path)}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "mlx_specdec", *args],
            env={**env, "MLX_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",  # rank 0's text is read in pieces, characters cut
        )
        for rank, args in enumerate(args_of_rank)
    ]


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Exit code and error lines of a rank that must end within `timeout` seconds."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"a rank still runs {timeout} s on: it waits forever")
    return proc.returncode, [line for line in err.splitlines() if line.startswith(ERROR)]


def first_output(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until rank 0 has printed generated text: generation is under way."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "rank 0 printed nothing"
    os.read(proc.stdout.fileno(), 64)


def generate(pair: tuple[str, str]) -> list[str]:
    model, drafter = pair
    return ["generate", "--model", model, "--drafter", drafter, "--no-chat", "--prompt", "a b c"]


@pytest.mark.parametrize(
    ("sharding", "says"),
    [
        ("tensor", "num_key_value_heads = 1, which 2 ranks cannot split evenly"),
        ("pipeline", "does not support pipelining"),
    ],
)
def test_a_model_the_world_cannot_split_stops_every_rank(tmp_path, sharding, says):
    """The demo target (one KV head, a Qwen3 without pipeline stages in mlx-lm)."""
    args = ["generate", "--model", str(DEMO_DIR / "target"), "--prompt", "x"]
    ranks = start(tmp_path, [[*args, "--sharding", sharding]] * 2)
    for proc in ranks:
        code, errors = finish(proc, 60)
        assert code == 2 and len(errors) == 1 and says in errors[0], errors


def test_a_drafter_missing_on_one_rank_stops_every_rank(tmp_path, pair):
    args = [*generate(pair), "--sharding", "tensor"]
    missing = [*args, "--drafter", str(tmp_path / "nowhere")]  # the later flag wins
    ranks = start(tmp_path, [args, missing])
    for proc in ranks:
        code, errors = finish(proc, 60)
        assert code == 2 and len(errors) == 1, errors
        assert errors[0].startswith(f"{ERROR}rank 1: drafter '{tmp_path / 'nowhere'}'")


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_others(tmp_path, pair, fault):
    """Rank 1 is killed (its sockets close) or stopped (it answers nothing) mid-generation:
    rank 0 ends within seconds with one line, the hang through --rank-timeout."""
    args = [*generate(pair), "--sharding", "tensor", "--max-new-tokens", "5000"]
    args += ["--max-draft", "4", "--rank-timeout", "8"]  # margin: a first kernel compile
    rank0, rank1 = start(tmp_path, [args, args])
    try:
        first_output(rank0)
        os.kill(rank1.pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        began = time.monotonic()
        code, errors = finish(rank0, 30)
        assert code == 2 and len(errors) == 1, errors
        said = "lost another rank" if fault == "dies" else "no progress for 8 s"
        assert said in errors[0], errors
        if fault == "hangs":
            assert time.monotonic() - began >= 8
    finally:
        rank1.kill()
        rank1.wait()


def test_sharding_outside_a_launch_is_one_line(tmp_path, pair):
    env = {k: v for k, v in ENV.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_specdec", *generate(pair), "--sharding", "pipeline"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith(ERROR)]
    assert done.returncode == 2 and len(errors) == 1 and "mlx.launch" in errors[0], done.stderr
