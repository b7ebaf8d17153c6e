"""`/v1/messages` (Anthropic's Messages API) driven by the official `anthropic` client: greedy
answers equal `speculative_generate`'s, streamed or not; the event sequence; stop sequences;
`count_tokens`; both auth headers; Anthropic-style errors; and (from a scripted engine, as the
tiny model calls no tools) thinking and tool-use blocks through a tool round trip."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from served import (
    KEY,
    TOOL_OUTPUT,
    WEATHER_ANSWER,
    WEATHER_CALL,
    ScriptedEngine,
    pair_engine,
    serve,
    weather_script,
)

from mlx_specdec import speculative_generate
from mlx_specdec.generate import encode_prompt
from mlx_specdec.server.messages import anthropic_conversation
from mlx_specdec.server.schemas_anthropic import MessagesRequest

SYSTEM = "Be brief."
TURNS = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": [{"type": "text", "text": "More?"}]},
]
AS_CHAT = [{"role": "system", "content": SYSTEM}, *TURNS[:2], {"role": "user", "content": "More?"}]
NO_THINKING = {"type": "disabled"}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def base(qwen3_fixture_pair):
    with serve(pair_engine(qwen3_fixture_pair)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(qwen3_fixture_pair):
    target, tokenizer, drafter, _ = qwen3_fixture_pair
    return speculative_generate(
        target, tokenizer, drafter, AS_CHAT, max_new_tokens=24, enable_thinking=False
    )


def _ask(client, **extra):
    args = dict(model="any", max_tokens=24, system=SYSTEM, messages=TURNS, thinking=NO_THINKING)
    return client.messages.create(**(args | extra))


def test_answer_equals_speculative_generate(client, expected):
    r = _ask(client)
    assert [b.type for b in r.content] == ["text"]
    assert r.content[0].text == expected.text
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None
    assert r.usage.output_tokens == len(expected.tokens) == 24
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == expected.prompt_tokens
    assert r.model_extra["x_specdec"]["mode"] == "dspark"


def test_stream_gives_the_same_answer_and_anthropics_events(client, base, expected):
    with client.messages.stream(
        model="any", max_tokens=24, system=SYSTEM, messages=TURNS, thinking=NO_THINKING
    ) as stream:
        deltas = [e.delta.text for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "".join(deltas) == final.content[0].text == expected.text and len(deltas) > 1
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 24
    body = {"model": "any", "max_tokens": 4, "messages": TURNS, "stream": True}
    with httpx.stream("POST", f"{base}/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}


def test_stop_sequence_is_cut_and_named(client, expected):
    stop = expected.text[5:8]
    r = _ask(client, stop_sequences=["never here", stop])
    assert r.content[0].text == expected.text[: expected.text.index(stop)]
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop


def test_count_tokens_is_the_prompt_the_answer_gets(client, qwen3_fixture_pair):
    n = client.messages.count_tokens(
        model="any", system=SYSTEM, messages=TURNS, thinking=NO_THINKING
    ).input_tokens
    tokenizer = qwen3_fixture_pair[1]
    assert n == len(encode_prompt(tokenizer, AS_CHAT, enable_thinking=False))
    r = _ask(client, max_tokens=1)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == n
    assert r.usage.cache_read_input_tokens > 0  # the same conversation ran before: cached


def test_auth_by_key_or_bearer_token(base):
    ok = anthropic.Anthropic(base_url=base, auth_token=KEY, max_retries=0)  # Authorization
    assert ok.messages.count_tokens(model="any", messages=TURNS[:1]).input_tokens > 0
    bad = anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="any", max_tokens=1, messages=TURNS[:1])
    assert e.value.body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "'image' blocks"),
        ({"messages": TURNS[:2]}, "prefill"),
        ({"tool_choice": {"type": "any"}, "tools": [WEATHER_TOOL]}, "tool_choice"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0]"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {}}}}, "structured"),
        ({"temperature": 1.5}, "temperature"),
        ({"max_tokens": 10**6}, "limit"),
        ({"mcp_servers": []}, "mcp_servers"),
        ({"stop_sequences": [""]}, "stop_sequences"),
    ],
)
def test_unsupported_or_bad_requests_get_anthropic_400s(client, extra, says):
    with pytest.raises(anthropic.BadRequestError) as e:
        _ask(client, extra_body=extra)  # (the newest client has no sampling arguments)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert says in e.value.body["error"]["message"]


def test_sampling_fields_and_advisory_ones_are_taken(client):
    sampled = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 3}
    advisory = {"output_config": {"effort": "low"}, "cache_control": {"type": "ephemeral"}}
    a, b = (_ask(client, max_tokens=8, extra_body=sampled | advisory) for _ in range(2))
    assert a.content[0].text == b.content[0].text  # same seed, same answer


def test_raw_errors_are_anthropic_objects(base):
    auth = {"x-api-key": KEY}
    r = httpx.post(f"{base}/v1/messages", content=b"{", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{base}/v1/messages/nothing", json={}, headers=auth)
    assert r.status_code == 404 and r.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Not Found"},
    }
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{", headers=auth)  # OpenAI's own
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "code"}


# ------------------------------------------------------------------------------ tool use
@pytest.fixture(scope="module")
def scripted_engine(qwen3_fixture_pair):
    return ScriptedEngine(qwen3_fixture_pair, weather_script)


@pytest.fixture(scope="module")
def scripted(scripted_engine):
    with serve(scripted_engine) as url:
        yield anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60)


ASK_WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


def _check_call(message) -> None:
    assert [b.type for b in message.content] == ["thinking", "tool_use"]
    assert message.content[0].thinking.startswith("The user wants the weather")
    call = message.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_round_trip(scripted, streamed):
    args = dict(model="any", max_tokens=200, tools=[WEATHER_TOOL], messages=ASK_WEATHER)
    if streamed:
        with scripted.messages.stream(**args) as stream:
            kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
            first = stream.get_final_message()
        assert {"thinking_delta", "signature_delta", "input_json_delta"} <= set(kinds)
    else:
        first = scripted.messages.create(**args)
    _check_call(first)
    result = {"type": "tool_result", "tool_use_id": first.content[1].id, "content": TOOL_OUTPUT}
    turns = ASK_WEATHER + [
        {"role": "assistant", "content": first.content},  # sent back as the client got it
        {"role": "user", "content": [result]},
    ]
    second = scripted.messages.create(**(args | {"messages": turns}))
    assert [b.type for b in second.content] == ["thinking", "text"]
    assert second.content[1].text == WEATHER_ANSWER.split("\n\n")[-1]
    assert second.stop_reason == "end_turn"


def test_tools_off_with_tool_choice_none_and_one_call_at_a_time(scripted):
    args = dict(model="any", max_tokens=200, tools=[WEATHER_TOOL], messages=ASK_WEATHER)
    off = scripted.messages.create(**args, tool_choice={"type": "none"})
    assert [b.type for b in off.content] == ["thinking", "text"]  # the call stays text
    assert "<tool_call>" in off.content[1].text and off.stop_reason == "end_turn"
    one = scripted.messages.create(
        **args, tool_choice={"type": "auto", "disable_parallel_tool_use": True}
    )
    _check_call(one)


def test_thinking_omitted_travels_in_the_signature(scripted):
    """The client sees no thinking text; sent back, the signature gives it to the template."""
    args = dict(model="any", max_tokens=200, tools=[WEATHER_TOOL], messages=ASK_WEATHER)
    omitted = {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}
    with scripted.messages.stream(**args, thinking=omitted) as stream:
        kinds = {e.delta.type for e in stream if e.type == "content_block_delta"}
        first = stream.get_final_message()
    assert "thinking_delta" not in kinds and first.content[0].thinking == ""
    assert scripted.messages.create(**args, thinking=omitted).content[0].thinking == ""
    back = [b.model_dump(exclude_none=True) for b in first.content]
    turns = ASK_WEATHER + [{"role": "assistant", "content": back}] + ASK_WEATHER
    conv = anthropic_conversation(MessagesRequest(model="any", max_tokens=9, messages=turns))
    assert conv.messages[1]["reasoning_content"].strip() == WEATHER_CALL.split("\n")[1]


def test_blocks_become_template_messages(scripted, scripted_engine):
    """System blocks, thinking, tool use and a user turn of tool results and text: each result
    its own tool message, in order."""
    turns = ASK_WEATHER + [
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Ask.", "signature": "x"},
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "text", "text": TOOL_OUTPUT}],
                },
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]
    system = [{"type": "text", "text": "Be"}, {"type": "text", "text": "kind."}]
    scripted.messages.create(model="any", max_tokens=50, messages=turns, system=system)
    assert scripted_engine.prompts[-1] == (
        "<|im_start|>system\nBe\nkind.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n"  # (this template writes no calls nor thinking)
        f"<|im_start|>tool\n{TOOL_OUTPUT}<|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
