"""Log-probabilities and penalties over HTTP: what chat completions, text completions and the
Responses API report equals what `speculative_generate` reports for the same request (which
tests/test_logprobs_penalties.py holds to plain decoding's), streamed or not; penalised greedy
answers equal `speculative_generate`'s with the same penalties, on every API; bad settings get
400s. Driven by the official `openai` and `anthropic` clients."""

from __future__ import annotations

import anthropic
import openai
import pytest
from served import KEY, pair_engine, serve

from mlx_specdec import speculative_generate

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
NO_THINK = {"enable_thinking": False}
N = 12
PENALTIES = dict(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3)
BIAS = {22: 2.0, 30: -1.0}


@pytest.fixture(scope="module")
def base(qwen3_fixture_pair):
    # No prefix cache: each request is prefilled as the cold reference run is, bit for bit.
    with serve(pair_engine(qwen3_fixture_pair, prefix_cache=False)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


def _expected(pair, prompt, **kwargs):
    target, tokenizer, drafter, _ = pair
    return speculative_generate(target, tokenizer, drafter, prompt, max_new_tokens=N, **kwargs)


@pytest.fixture(scope="module")
def scored(qwen3_fixture_pair):
    """The reference: greedy, thinking off, the top 3 at every position."""
    return _expected(
        qwen3_fixture_pair, HELLO, enable_thinking=False, logprobs=True, top_logprobs=3
    )


def _check(entries, expected, top: int = 3) -> None:
    """OpenAI token entries against a `GenerationResult`'s scores."""
    assert [e.logprob for e in entries] == expected.logprobs
    assert [[t.logprob for t in e.top_logprobs] for e in entries] == [
        [v for _, v in row[:top]] for row in expected.top_logprobs
    ]
    assert "".join(e.token for e in entries) == expected.text


def test_chat_logprobs_equal_speculative_generate(client, scored):
    args = dict(model="any", messages=HELLO, max_tokens=N, extra_body=NO_THINK, logprobs=True)
    r = client.chat.completions.create(**args, top_logprobs=3)
    assert r.choices[0].message.content == scored.text
    _check(r.choices[0].logprobs.content, scored)
    chunks = list(client.chat.completions.create(**args, top_logprobs=3, stream=True))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    _check(streamed, scored)
    plain = client.chat.completions.create(**args)  # logprobs without the top ones
    assert [e.logprob for e in plain.choices[0].logprobs.content] == scored.logprobs
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    none = client.chat.completions.create(**{**args, "logprobs": False})
    assert none.choices[0].logprobs is None


def test_completions_logprobs_equal_speculative_generate(client, qwen3_fixture_pair):
    expected = _expected(qwen3_fixture_pair, "Once upon", chat=False, logprobs=True, top_logprobs=2)
    r = client.completions.create(model="any", prompt="Once upon", max_tokens=N, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == expected.text and lp.token_logprobs == expected.logprobs
    assert [sorted(d.values(), reverse=True) for d in lp.top_logprobs] == [
        [v for _, v in row] for row in expected.top_logprobs
    ]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = client.completions.create(
        model="any", prompt="Once upon", max_tokens=N, logprobs=0, stream=True
    )
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    got = [v for lp in pieces for v in lp.token_logprobs]
    assert got == expected.logprobs


def test_responses_logprobs_equal_speculative_generate(client, scored):
    args = dict(
        model="any",
        input=HELLO[1:],
        instructions=HELLO[0]["content"],
        max_output_tokens=N,
        reasoning={"effort": "none"},
        include=["message.output_text.logprobs"],
        top_logprobs=3,
    )
    r = client.responses.create(**args)
    _check(r.output[0].content[0].logprobs, scored)
    events = list(client.responses.create(**args, stream=True))
    _check(
        [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs], scored
    )
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    _check(done.logprobs, scored)
    plain = client.responses.create(**{**args, "include": [], "top_logprobs": 0})
    assert plain.output[0].content[0].logprobs == []


def test_penalised_answers_equal_speculative_generate_on_every_api(
    base, client, qwen3_fixture_pair
):
    expected = _expected(
        qwen3_fixture_pair, HELLO, enable_thinking=False, logit_bias=BIAS, **PENALTIES
    )
    plain = _expected(qwen3_fixture_pair, HELLO, enable_thinking=False)
    assert expected.text != plain.text  # the penalties change this answer
    bias = {str(k): v for k, v in BIAS.items()}
    chat = client.chat.completions.create(
        model="any",
        messages=HELLO,
        max_tokens=N,
        presence_penalty=PENALTIES["presence_penalty"],
        frequency_penalty=PENALTIES["frequency_penalty"],
        logit_bias=bias,
        extra_body={**NO_THINK, "repetition_penalty": PENALTIES["repetition_penalty"]},
    )
    assert chat.choices[0].message.content == expected.text
    extras = {**PENALTIES, "logit_bias": bias}
    responses = client.responses.create(
        model="any",
        input=HELLO[1:],
        instructions=HELLO[0]["content"],
        max_output_tokens=N,
        reasoning={"effort": "none"},
        extra_body=extras,
    )
    assert responses.output_text == expected.text
    messages = anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0).messages.create(
        model="any",
        system=HELLO[0]["content"],
        messages=HELLO[1:],
        max_tokens=N,
        thinking={"type": "disabled"},
        extra_body=extras,
    )
    assert messages.content[0].text == expected.text


def test_context_size_widens_every_penalty(client, qwen3_fixture_pair):
    expected = _expected(
        qwen3_fixture_pair, HELLO, enable_thinking=False, penalty_context_size=64, **PENALTIES
    )
    r = client.chat.completions.create(
        model="any",
        messages=HELLO,
        max_tokens=N,
        extra_body={**NO_THINK, **PENALTIES, "repetition_context_size": 64},
    )
    assert r.choices[0].message.content == expected.text


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"top_logprobs": 2}, "needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"100000": 1}}, "below 512"),
        ({"logit_bias": {"a": 1}}, "token ids"),
        ({"logit_bias": {"1": 101}}, "-100 to 100"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_context_size": 5, "frequency_context_size": 6}, "one context size"),
    ],
)
def test_bad_settings_get_400s(client, extra, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="any", messages=HELLO, max_tokens=1, extra_body=extra)
    assert says in e.value.message
