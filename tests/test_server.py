"""`mlx-specdec serve` as users run it: a real server process on 127.0.0.1 with a tiny DSpark
pair, driven by the official `openai` client (and httpx where the client cannot go)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mlx_specdec import load_pair, speculative_generate
from mlx_specdec.server.output import OutputSplitter, StopFilter, prompt_opens_thinking

PAIR = Path(__file__).parent / "fixtures" / "conformance" / "dspark_qwen3"
KEY = "test-key-123"
LIMIT = 4000
LONG_PROMPT = "Once upon"  # the tiny target runs past 1500 tokens on it without an end token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "mlx_specdec", "serve", "--model", str(PAIR / "target")]
    cmd += ["--drafter", str(PAIR / "drafter"), "--drafter-bits", "16", "--port", str(port)]
    if "--max-draft" not in flags:  # the full block, as speculative_generate's default
        cmd += ["--max-draft", "0"]
    cmd += ["--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


def _stop(proc: subprocess.Popen) -> bool:
    """Ctrl-C-like shutdown; False if the server had to be killed."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        return False


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, base = _start("--api-key", KEY, "--max-queue", "1", "--max-tokens-limit", str(LIMIT))
    yield base
    assert _stop(proc), "the server did not shut down on SIGTERM"


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pair():
    target, tokenizer, drafter, _ = load_pair(
        str(PAIR / "target"), str(PAIR / "drafter"), drafter_bits=16
    )
    return target, tokenizer, drafter


def _generate(pair, prompt, **kwargs):
    return speculative_generate(*pair, prompt, **kwargs)


def _metric(server: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server}/metrics", headers={"x-api-key": KEY}).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
NO_THINK = {"enable_thinking": False}


def test_chat_equals_speculative_generate(client, pair):
    r = client.chat.completions.create(
        model="any", messages=HELLO, max_tokens=24, extra_body=NO_THINK
    )
    expected = _generate(pair, HELLO, max_new_tokens=24, enable_thinking=False)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == len(expected.tokens) == 24
    assert r.usage.prompt_tokens == expected.prompt_tokens
    x = r.model_extra["x_specdec"]
    assert x["mode"] == "dspark" and x["drafter"].endswith("drafter")
    assert x["rounds"] == len(expected.rounds) and x["mean_accept_len"] >= 1
    assert x["prefill_ms"] > 0 and x["decode_tokens_per_sec"] > 0


def test_chat_stream_and_multi_turn(client, pair):
    messages = HELLO + [
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "More?"}]},
    ]
    stream = client.chat.completions.create(
        model="any",
        messages=messages,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_THINK,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected_messages = messages[:-1] + [{"role": "user", "content": "More?"}]
    expected = _generate(pair, expected_messages, max_new_tokens=20, enable_thinking=False)
    assert text == expected.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].model_extra["x_specdec"]["mode"] == "dspark"


def test_completions_stream_and_not(client, pair):
    expected = _generate(pair, LONG_PROMPT, max_new_tokens=16, chat=False)
    r = client.completions.create(model="any", prompt=LONG_PROMPT, max_tokens=16)
    assert r.choices[0].text == expected.text
    assert r.usage.completion_tokens == 16 and "x_specdec" in r.model_extra
    chunks = list(
        client.completions.create(model="any", prompt=LONG_PROMPT, max_tokens=16, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].usage.total_tokens == expected.prompt_tokens + 16  # usage even unasked


def test_stop_sequences_never_emitted(client, pair):
    full = _generate(pair, LONG_PROMPT, max_new_tokens=40, chat=False).text
    stop = full[20:26]  # a stop that spans several streamed pieces
    cut = full[: full.index(stop)]
    r = client.completions.create(model="any", prompt=LONG_PROMPT, max_tokens=40, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="any", prompt=LONG_PROMPT, max_tokens=40, stop=["@@", stop], stream=True
        )
    ]
    assert "".join(pieces) == cut and not any(stop in p for p in pieces)


def test_seed_determinism(client, pair):
    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model="any",
            messages=HELLO,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body=NO_THINK,
        )
        return r.choices[0].message.content

    first = ask(7)
    assert ask(7) == first
    assert ask(8) != first
    same = _generate(pair, HELLO, max_new_tokens=16, temperature=1.0, seed=7, enable_thinking=False)
    assert first == same.text


def test_thinking_toggle(client, pair):
    ONLY_HELLO = HELLO[1:]
    raw = _generate(pair, ONLY_HELLO, max_new_tokens=24).text
    assert raw.startswith("<think>")  # the tiny Qwen3 opens (an empty) thinking block itself
    answer = raw.split("</think>", 1)[1].lstrip()
    on = client.chat.completions.create(model="any", messages=ONLY_HELLO, max_tokens=24)
    assert on.choices[0].message.content == answer
    assert "<think>" not in on.choices[0].message.content
    streamed = client.chat.completions.create(
        model="any", messages=ONLY_HELLO, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer
    off = client.chat.completions.create(
        model="any",
        messages=ONLY_HELLO,
        max_tokens=24,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    off_expected = _generate(pair, ONLY_HELLO, max_new_tokens=24, enable_thinking=False)
    assert off.choices[0].message.content == off_expected.text
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the template closed the block


def test_tools_accepted_and_history_rendered(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model="any", messages=messages, tools=tools, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model="any", messages=messages, tools=tools, tool_choice="required", max_tokens=4
        )


def test_auth(server, client):
    assert httpx.get(f"{server}/health").status_code == 200  # open, for probes
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": KEY + "x"}):
        r = httpx.get(f"{server}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert httpx.get(f"{server}/v1/models", headers={"x-api-key": KEY}).status_code == 200
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == [str(PAIR / "target")]


def test_bad_input_gives_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="n: must be 1"):
        client.chat.completions.create(model="any", messages=HELLO, n=2)
    with pytest.raises(openai.BadRequestError, match="limit of 4000"):
        client.completions.create(model="any", prompt="x", max_tokens=LIMIT + 1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="any", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="any", prompt=[1, 10**6])
    with pytest.raises(openai.BadRequestError, match="beyond this model's context of 2048"):
        client.completions.create(model="any", prompt=[5] * 2048, max_tokens=1)
    auth = {"x-api-key": KEY, "content-type": "application/json"}
    url = f"{server}/v1/chat/completions"
    for body, status in [
        (b'{"messages": [', 400),
        (b"[1, 2]", 400),
        (b'{"messages": []}', 400),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
        (b"{" + b" " * (5 * 1024 * 1024) + b"}", 413),
    ]:
        r = httpx.post(url, content=body, headers=auth)
        assert r.status_code == status, body[:40]
        assert r.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/nothing", headers=auth).json()["error"]["type"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def _wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnect_stops_generation_and_full_queue_503(server, client):
    health = lambda: httpx.get(f"{server}/health").json()  # noqa: E731
    before = _metric(server, "specdec_generated_tokens_total")
    body = {"prompt": LONG_PROMPT, "max_tokens": LIMIT, "stream": True}
    headers = {"x-api-key": KEY}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers) as a:
        lines = a.iter_lines()
        assert next(lines).startswith("data: ")  # A is generating
        # B waits in the one-slot queue...
        b_result: dict = {}
        b = threading.Thread(
            target=lambda: b_result.update(
                r=client.completions.create(model="any", prompt="Hi", max_tokens=4)
            )
        )
        b.start()
        _wait_for(lambda: health()["queued"] == 1)
        # ...so C is turned away with a hint when to come back.
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="any", prompt="Hi", max_tokens=4)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["type"] == "server_busy"
    # A's client left: its generation stops at the next round and B runs.
    b.join(timeout=30)
    assert b_result["r"].usage.completion_tokens == 4
    spent = _metric(server, "specdec_generated_tokens_total") - before
    assert spent < LIMIT / 4, f"{spent} tokens: generation went on after the disconnect"
    assert (
        _metric(server, "specdec_requests_total", '{endpoint="completions",outcome="disconnected"}')
        >= 1
    )
    assert (
        _metric(server, "specdec_requests_total", '{endpoint="completions",outcome="rejected"}')
        >= 1
    )
    # A non-streaming client that times out is also noticed.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{server}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=1.0
        )
    _wait_for(lambda: not health()["busy"], timeout=10)
    text = httpx.get(f"{server}/metrics", headers=headers).text
    assert "specdec_accept_length_bucket" in text and "specdec_decode_tokens_per_second" in text


FUZZ_CHECKS = [
    "not_a_server_error",  # no 5xx, whatever the body
    "negative_data_rejection",  # what the schema forbids is refused (strict types, bounds)
    "ignored_auth",  # the key is enforced where the schema says it is needed
    "unsupported_method",  # other methods get 405
    "missing_required_header",
]


def test_schemathesis_finds_no_server_error():
    """Every route, fuzzed from the OpenAPI schema: valid and invalid bodies, boundary values
    (the coverage phase) and the stateful phase (it finds no links between these routes, so it
    says not applicable; test_server_hardening.py has a stateful fuzz of its own)."""
    proc, base = _start("--max-tokens", "4", "--max-tokens-limit", "4", "--api-key", KEY)
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{base}/openapi.json",
                "--checks",
                ",".join(FUZZ_CHECKS),
                "--phases",
                "coverage,fuzzing,stateful",
                "--max-examples",
                "150",
                "--workers",
                "1",
                "--seed",
                "1",
                "--generation-database",
                "none",
                "--no-color",
                "-H",
                f"Authorization: Bearer {KEY}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
        )
        assert run.returncode == 0, run.stdout[-3000:]
        assert "8 selected / 8 total" in run.stdout  # every route
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
    finally:
        _stop(proc)


# The output pipeline on text the tiny model will not write: fed in every piece size.


def _feed(splitter: OutputSplitter, text: str, step: int):
    deltas = [splitter.feed(text[i : i + step]) for i in range(0, len(text), step)]
    deltas.append(splitter.flush())
    return (
        "".join(d.reasoning for d in deltas),
        "".join(d.content for d in deltas),
        [(c.name, json.loads(c.arguments)) for d in deltas for c in d.tool_calls],
    )


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_splitter_reasoning_and_tool_calls(step):
    qwen = (
        '<think>\nLet me look.\n</think>\n\nSure. <tool_call>\n{"name": "f", "arguments": '
        '{"x": 1}}\n</tool_call>'
    )
    gemma = '<|channel>thought\nhm<channel|>Ok <|tool_call>call:g{city:<|"|>Paris<|"|>}<tool_call|>'
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert _feed(OutputSplitter(tools=tools), qwen, step) == (
        "Let me look.\n",
        "Sure. ",
        [("f", {"x": 1})],
    )
    assert _feed(OutputSplitter(tools=tools), gemma, step) == (
        "hm",
        "Ok ",
        [("g", {"city": "Paris"})],
    )
    # without tools the markers are text; a block that is not a call stays visible
    assert _feed(OutputSplitter(), "a <tool_call>{}</tool_call>", step)[1] == (
        "a <tool_call>{}</tool_call>"
    )
    assert _feed(OutputSplitter(tools=tools), "a <tool_call>oops</tool_call>", step)[1] == (
        "a <tool_call>oops</tool_call>"
    )
    # cut off by max_tokens: parsed if it can be
    assert _feed(OutputSplitter(tools=tools), '<tool_call>{"name": "f"}', step)[2] == [("f", {})]
    # a template that pre-opened the block: only the closer comes
    assert _feed(OutputSplitter(in_reasoning=True), "why</think>because", step)[:2] == (
        "why",
        "because",
    )


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stop_filter_across_pieces(step):
    text = "abc STOP def"
    f = StopFilter(["STO", "STOP", "zz"])
    out = "".join(f.feed(text[i : i + step]) for i in range(0, len(text), step)) + f.flush()
    assert out == "abc " and f.hit
    f = StopFilter(["zz"])
    out = "".join(f.feed(c) for c in ["a", "z", "b", "z"]) + f.flush()
    assert out == "azbz" and not f.hit


# ------------------------------------------------------------------------------ prefix cache
SHARED = [{"role": "system", "content": "You count numbers and letters. " * 12}]


def test_follow_up_turn_is_served_from_the_prefix_cache(client, pair):
    first = SHARED + [{"role": "user", "content": "The 7th?"}]
    r1 = client.chat.completions.create(
        model="any", messages=first, max_tokens=12, extra_body=NO_THINK
    )
    follow = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "And the 8th?"},
    ]
    r2 = client.chat.completions.create(
        model="any", messages=follow, max_tokens=12, extra_body=NO_THINK
    )
    cold = _generate(pair, follow, max_new_tokens=12, enable_thinking=False)
    assert r2.choices[0].message.content == cold.text
    x = r2.model_extra["x_specdec"]
    assert x["prefix_cache"] == "hit" and x["cached_prompt_tokens"] > 100
    assert r2.usage.prompt_tokens_details.cached_tokens == x["cached_prompt_tokens"]
    assert x["cached_prompt_tokens"] < r2.usage.prompt_tokens == cold.prompt_tokens


def test_prefix_cache_metrics(server):
    assert _metric(server, "specdec_prefix_cache_lookups_total", '{outcome="hit"}') >= 1
    assert _metric(server, "specdec_cached_prompt_tokens_total") > 100
    assert _metric(server, "specdec_prefix_cache_bytes", '{tier="ram"}') > 0


def test_concurrent_requests_sharing_a_prefix_and_spill(tmp_path, pair):
    """Four clients at once, one shared system prompt, a RAM tier of about one entry spilling to
    a folder: every answer equals a cold run, the later ones reuse the shared prefix."""
    proc, base = _start("--prefix-cache-max-ram-mb", "0.6", "--prefix-cache-dir", str(tmp_path))
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        questions = [f"Count to {n}." for n in range(4)]
        results: dict[int, object] = {}

        def ask(i: int) -> None:
            messages = SHARED + [{"role": "user", "content": questions[i]}]
            results[i] = client.chat.completions.create(
                model="any", messages=messages, max_tokens=10, extra_body=NO_THINK
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        cached = []
        for i, q in enumerate(questions):
            messages = SHARED + [{"role": "user", "content": q}]
            cold = _generate(pair, messages, max_new_tokens=10, enable_thinking=False)
            assert results[i].choices[0].message.content == cold.text
            cached.append(results[i].model_extra["x_specdec"]["cached_prompt_tokens"])
        assert sorted(cached)[0] == 0 and all(c > 50 for c in sorted(cached)[1:])
        assert list(tmp_path.glob("*.safetensors")), "evicted entries were not spilled"
    finally:
        assert _stop(proc)


def test_prefix_cache_off_and_bad_flags(tmp_path):
    proc, base = _start("--no-prefix-cache")
    try:
        r = httpx.post(
            f"{base}/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 3}
        ).json()
        assert r["x_specdec"]["prefix_cache"] == "off"
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        assert _stop(proc)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for flags, message in [
        (["--prefix-cache-max-ram-mb", "-1"], "must be >= 0"),
        (["--prefix-cache-dir", str(blocker / "sub")], "--prefix-cache-dir"),
    ]:
        cmd = [sys.executable, "-m", "mlx_specdec", "serve", "--model", str(PAIR / "target")]
        out = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
