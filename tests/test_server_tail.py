"""The end of an answer: the text the detokenizer still holds when generation ends (the first
bytes of a character, a lone space) and a partial stop-sequence match held back at the end both
reach the client. For chat and text completions, Messages and Responses, streamed and not, the
answer's text is the tokenizer's decode of its tokens (cut before a matched stop sequence), and
the streamed pieces join to the non-streamed text. Served by the real engine, one request at a
time and in batched rounds.

The fixture pair writes random text, so the cases below are found by generating: the answers are
greedy, so the server's tokens are `speculative_generate`'s."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from served import KEY, pair_engine, serve

from mlx_specdec import speculative_generate
from mlx_specdec.generate import encode_prompt
from mlx_specdec.server.engine import Engine

HEADERS = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Q"}]  # 64 tokens end on a lone space the detokenizer holds
CHAT_TOKENS = 64
TEXT = "1 2 3"  # raw text: 4 tokens end inside a character
TEXT_TOKENS = 4
APIS = ["chat", "completions", "messages", "responses"]


@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "batched"])
def base(request, qwen3_fixture_pair):
    if request.param == 1:
        engine = pair_engine(qwen3_fixture_pair)
    else:
        target, tokenizer, drafter, config = qwen3_fixture_pair
        engine = Engine(target, tokenizer, drafter, config, max_queue=4, max_batch=2)
    with serve(engine) as url:
        yield url


def _generate(pair, api: str, n: int) -> tuple[list[int], str]:
    """The greedy answer's tokens and the tokenizer's decode of them."""
    target, tokenizer, drafter, _ = pair
    if api == "completions":
        ids = encode_prompt(tokenizer, TEXT, chat=False)
    else:
        ids = encode_prompt(tokenizer, CHAT, enable_thinking=False)
    r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=n)
    return r.tokens, tokenizer.decode(r.tokens)


@pytest.fixture(scope="module")
def answers(qwen3_fixture_pair) -> dict[str, tuple[list[int], str]]:
    chat = _generate(qwen3_fixture_pair, "chat", CHAT_TOKENS)
    text = _generate(qwen3_fixture_pair, "completions", TEXT_TOKENS)
    # The cases hold what they are chosen for: a tail only the detokenizer's finalize releases.
    assert chat[1].endswith(" ") and not chat[1].endswith("  ") and len(chat[0]) == CHAT_TOKENS
    assert text[1].endswith("\ufffd") and len(text[0]) == TEXT_TOKENS
    return {"chat": chat, "completions": text, "messages": chat, "responses": chat}


def _body(api: str, n: int, stop: list[str] | None, stream: bool) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": "tiny", "stream": stream}
    if api == "completions":
        body |= {"prompt": TEXT, "max_tokens": n}
    elif api == "chat":
        thinking = {"enable_thinking": False}
        body |= {"messages": CHAT, "max_tokens": n, "chat_template_kwargs": thinking}
    elif api == "messages":
        body |= {"messages": CHAT, "max_tokens": n, "thinking": {"type": "disabled"}}
    else:
        body |= {"input": "Q", "max_output_tokens": n, "reasoning": {"effort": "none"}}
    if stop is not None:
        body["stop_sequences" if api == "messages" else "stop"] = stop
    path = {"chat": "chat/completions", "completions": "completions"}.get(api, api)
    return f"/v1/{path}", body


def _finish(api: str, final: dict[str, Any]) -> tuple[str, int]:
    """How the answer ended, as "stop" / "length", and its count of generated tokens."""
    if api in ("chat", "completions"):
        return final["choices"][0]["finish_reason"], final["usage"]["completion_tokens"]
    if api == "messages":
        reason = {"max_tokens": "length", "end_turn": "stop", "stop_sequence": "stop"}
        return reason[final["stop_reason"]], final["usage"]["output_tokens"]
    length = final["status"] == "incomplete"
    return ("length" if length else "stop"), final["usage"]["output_tokens"]


def _text(api: str, body: dict[str, Any]) -> str:
    if api == "chat":
        return body["choices"][0]["message"]["content"]
    if api == "completions":
        return body["choices"][0]["text"]
    if api == "messages":
        return "".join(b["text"] for b in body["content"] if b["type"] == "text")
    return "".join(
        part["text"]
        for item in body["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def _streamed(base: str, api: str, path: str, body: dict[str, Any]) -> tuple[str, str, int]:
    """A streamed answer's joined text pieces, finish reason and token count."""
    pieces: list[str] = []
    reason, usage, final = None, None, None
    with httpx.stream("POST", base + path, json=body, headers=HEADERS, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if api in ("chat", "completions"):
                for c in event.get("choices", []):
                    piece = c["delta"].get("content") if api == "chat" else c["text"]
                    pieces.append(piece or "")
                    reason = c["finish_reason"] or reason
                usage = event.get("usage") or usage
            elif api == "messages":
                delta = event.get("delta", {})
                if event["type"] == "content_block_delta" and delta["type"] == "text_delta":
                    pieces.append(delta["text"])
                if event["type"] == "message_delta":
                    final = {"stop_reason": event["delta"]["stop_reason"], "usage": event["usage"]}
            else:
                if event["type"] == "response.output_text.delta":
                    pieces.append(event["delta"])
                if event["type"] in ("response.completed", "response.incomplete"):
                    final = event["response"]
    if api in ("chat", "completions"):
        final = {"choices": [{"finish_reason": reason}], "usage": usage}
    return ("".join(pieces), *_finish(api, final))


def _ask(base: str, api: str, n: int, stop: list[str] | None = None) -> tuple[str, str, int]:
    """The answer's text, finish reason and token count; the streamed answer must be the same
    (after a stop sequence too: rounds the engine commits before it sees the cancel are not
    counted)."""
    path, body = _body(api, n, stop, stream=False)
    r = httpx.post(base + path, json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    whole = (_text(api, r.json()), *_finish(api, r.json()))
    path, body = _body(api, n, stop, stream=True)
    streamed = _streamed(base, api, path, body)
    assert streamed == whole
    return whole


def _expected(api: str, decoded: str) -> str:
    """The decode as the API shows it: chat-like answers start at their first non-space."""
    return decoded if api == "completions" else decoded.lstrip()


def _n(api: str) -> int:
    return TEXT_TOKENS if api == "completions" else CHAT_TOKENS


@pytest.mark.parametrize("api", APIS)
def test_a_length_cut_keeps_the_held_tail(base, answers, api):
    tokens, decoded = answers[api]
    text, reason, n = _ask(base, api, _n(api))
    assert (text, reason, n) == (_expected(api, decoded), "length", len(tokens))


@pytest.mark.parametrize("api", ["chat", "completions", "messages"])
def test_a_stop_sequence_cuts_at_its_first_match(base, answers, api):
    tokens, decoded = answers[api]
    expected = _expected(api, decoded)
    stop = expected[len(expected) // 2 - 1 : len(expected) // 2 + 1]
    text, reason, n = _ask(base, api, _n(api), [stop])
    assert reason == "stop" and stop not in text
    assert text == expected[: expected.index(stop)]
    assert 0 < n < len(tokens)


@pytest.mark.parametrize("api", ["chat", "completions", "messages"])
def test_a_partial_stop_match_held_at_the_end_is_released(base, answers, api):
    """A stop sequence that the answer's last characters begin: held back while it could still
    match, given back when the answer ends without it."""
    tokens, decoded = answers[api]
    expected = _expected(api, decoded)
    text, reason, n = _ask(base, api, _n(api), [expected[-2:] + "~~never"])
    assert (text, reason, n) == (expected, "length", len(tokens))


@pytest.mark.parametrize("api", ["chat", "completions", "messages"])
def test_a_stop_sequence_ending_in_the_held_tail_is_matched(base, answers, api):
    """The stop sequence is only complete with the detokenizer's held tail."""
    _, decoded = answers[api]
    expected = _expected(api, decoded)
    stop = expected[-3:]
    assert stop not in expected[:-1]
    text, reason, _ = _ask(base, api, _n(api), [stop])
    assert (text, reason) == (expected[:-3], "stop")


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_a_partial_stop_match_is_released_without_a_held_tail(
    base, answers, api, qwen3_fixture_pair
):
    """One token shorter, the answer ends on a whole word: only the stop filter holds back."""
    tokens, _ = answers[api]
    decoded = qwen3_fixture_pair[1].decode(tokens[:-1])
    assert not decoded.endswith(" ")
    expected = _expected(api, decoded)
    text, reason, n = _ask(base, api, CHAT_TOKENS - 1, [expected[-2:] + "~~never"])
    assert (text, reason, n) == (expected, "length", CHAT_TOKENS - 1)


def test_a_completion_keeps_its_leading_space(base, qwen3_fixture_pair):
    """mlx-lm's detokenizer drops an answer's leading space (right for chat); a text completion
    continues its prompt, so "The" goes on with " 7th ...", streamed and not, alone and
    batched. From Python, `leading_space=True` does the same and the default stays mlx-lm's."""
    target, tokenizer, drafter, _ = qwen3_fixture_pair
    ids = encode_prompt(tokenizer, "The", chat=False)
    plain = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=8)
    decoded = tokenizer.decode(plain.tokens)
    assert decoded.startswith(" ") and plain.text == decoded[1:]
    kept = speculative_generate(
        target, tokenizer, drafter, ids, max_new_tokens=8, leading_space=True
    )
    assert kept.text == decoded
    body = {"model": "tiny", "prompt": "The", "max_tokens": 8}
    r = httpx.post(base + "/v1/completions", json=body, headers=HEADERS, timeout=120)
    assert r.json()["choices"][0]["text"] == decoded
    assert _streamed(base, "completions", "/v1/completions", body | {"stream": True})[0] == decoded
