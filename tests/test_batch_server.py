"""The server with `--max-batch` > 1: requests decode together in batched rounds, each one's
answer what it is alone; a client that leaves frees its row; shutdown and metrics hold."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from served import KEY, serve

from mlx_specdec import load_pair
from mlx_specdec.server.engine import Engine

HEADERS = {"x-api-key": KEY}
PROMPTS = ["def read_lines(path):", "class Queue:", "import os\n", "x = 1\n", "def f(a, b):"]


@pytest.fixture(scope="module")
def demo():
    return load_pair(mode="dspark")


def complete(base: str, prompt: str, **body) -> str:
    """A streamed completion's text."""
    body = {"prompt": prompt, "max_tokens": 24, "stream": True, **body}
    text = []
    with httpx.stream(
        "POST", f"{base}/v1/completions", json=body, headers=HEADERS, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"]
                text += [c["text"] for c in choice]
    return "".join(text)


def concurrently(base: str, bodies: list[dict]) -> list[str]:
    out: list[str | None] = [None] * len(bodies)

    def one(i: int) -> None:
        out[i] = complete(base, **bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
        time.sleep(0.05)  # they join the batch at different rounds
    for t in threads:
        t.join(timeout=300)
    return out


def bodies() -> list[dict]:
    out = []
    for i, p in enumerate(PROMPTS):
        body = {"prompt": p, "max_tokens": 10 + 7 * i}
        if i % 2:
            body.update(temperature=0.8, seed=100 + i)
        if i == 2:
            body["stop"] = ["\n"]
        out.append(body)
    return out


def test_batched_answers_are_each_alone(demo):
    target, tokenizer, drafter, config = demo
    serial = Engine(target, tokenizer, drafter, config)
    batched = Engine(target, tokenizer, drafter, config, max_batch=4)
    greedy = [b for b in bodies() if "seed" not in b]
    with serve(serial) as base:
        alone_serial = [complete(base, **b) for b in greedy]
    with serve(batched) as base:
        alone = [complete(base, **b) for b in bodies()]
        together = concurrently(base, bodies())
        metrics = httpx.get(f"{base}/metrics", headers=HEADERS).text
    assert together == alone
    assert [t for t, b in zip(alone, bodies()) if "seed" not in b] == alone_serial
    assert 'specdec_requests_total{endpoint="completions",outcome="ok"} 10.0' in metrics
    assert "specdec_batch_size 0.0" in metrics
    shared = [line for line in metrics.splitlines() if 'round_rows_bucket{le="1.0"}' in line]
    steps = [line for line in metrics.splitlines() if "round_rows_count" in line]
    assert float(shared[0].split()[-1]) < float(steps[0].split()[-1])  # some steps had rows > 1


def test_a_client_that_leaves_frees_its_row(demo):
    target, tokenizer, drafter, config = demo
    engine = Engine(target, tokenizer, drafter, config, max_batch=2)
    with serve(engine) as base:
        body = {"prompt": "def f(x):", "max_tokens": 2000, "stream": True}
        with httpx.stream(
            "POST", f"{base}/v1/completions", json=body, headers=HEADERS, timeout=60
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 20
        while engine.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.busy and not engine._rows
        text = httpx.get(f"{base}/metrics", headers=HEADERS).text
        generated = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("specdec_generated_tokens_total")
        )
        assert generated < 500, f"{generated} tokens: the row went on after the client left"
        assert complete(base, "x = 1\n", max_tokens=5)  # the engine still serves


def test_bad_max_batch(demo):
    target, tokenizer, drafter, config = demo
    with pytest.raises(Exception, match="max-batch"):
        Engine(target, tokenizer, drafter, config, max_batch=0)
