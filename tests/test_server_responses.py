"""`/v1/responses` (OpenAI's Responses API) driven by the official `openai` client's
`client.responses`: greedy answers equal `speculative_generate`'s, streamed or not, with the
typed events; `previous_response_id` served from the store and the prefix cache, a missing id a
404; refusals; and (from a scripted engine, as the tiny model calls no tools) reasoning items and
a function-call round trip, with stored state and without."""

from __future__ import annotations

import openai
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
from mlx_specdec.server.responses import ResponseStore

INSTRUCTIONS = "Be brief."
OFF = {"effort": "none"}  # thinking off
INPUT = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "More?"}]},
]
AS_CHAT = [
    {"role": "system", "content": INSTRUCTIONS},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "More?"},
]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}


@pytest.fixture(scope="module")
def client(qwen3_fixture_pair):
    with serve(pair_engine(qwen3_fixture_pair), response_store=3) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _generate(pair, messages, n):
    target, tokenizer, drafter, _ = pair
    return speculative_generate(
        target, tokenizer, drafter, messages, max_new_tokens=n, enable_thinking=False
    )


def _ask(client, **extra):
    args = dict(model="any", instructions=INSTRUCTIONS, input=INPUT, reasoning=OFF)
    return client.responses.create(**(args | {"max_output_tokens": 24} | extra))


def test_answer_equals_speculative_generate(client, qwen3_fixture_pair):
    r = _ask(client)
    expected = _generate(qwen3_fixture_pair, AS_CHAT, 24)
    assert [item.type for item in r.output] == ["message"]
    assert r.output_text == expected.text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 24 and r.usage.input_tokens == expected.prompt_tokens
    assert r.model_extra["x_specdec"]["mode"] == "dspark"


def test_stream_gives_the_same_answer_as_typed_events(client):
    events = list(_ask(client, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == _ask(client).output_text


def test_previous_response_id_continues_from_the_store_and_the_cache(client, qwen3_fixture_pair):
    first = client.responses.create(model="any", input="Hello", reasoning=OFF, max_output_tokens=6)
    second = client.responses.create(
        model="any",
        input="More?",
        previous_response_id=first.id,
        reasoning=OFF,
        max_output_tokens=6,
    )
    turns = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "More?"},
    ]
    expected = _generate(qwen3_fixture_pair, turns, 6)
    assert second.output_text == expected.text
    assert second.usage.input_tokens == expected.prompt_tokens
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens // 2
    assert second.previous_response_id == first.id


def test_a_missing_previous_response_is_a_404(client):
    unstored = _ask(client, store=False, max_output_tokens=1)
    for missing in ("resp_nothing", unstored.id):
        with pytest.raises(openai.NotFoundError) as e:
            _ask(client, previous_response_id=missing)
        assert e.value.code == "previous_response_not_found"
        assert e.value.param == "previous_response_id" and missing in e.value.message


def test_the_store_keeps_the_most_recently_used():
    store = ResponseStore(2)
    for n in "abc":
        store.put(n, [{"n": n}])
        store.get("a")  # keeps a in use
    assert store.get("a") and store.get("c") and store.get("b") is None
    ResponseStore(0).put("x", [])  # keeps nothing, refuses nothing


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input_image"),
        ({"input": [{"type": "computer_call"}]}, "computer_call"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"input": []}, "input: is empty"),
        ({"temperature": 3}, "temperature"),
        ({"input": [{"type": "reasoning", "encrypted_content": "gAAAA"}]}, "not made by this"),
    ],
)
def test_unsupported_or_bad_requests_get_openai_400s(client, extra, says):
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, **extra)
    assert says in e.value.message and e.value.type == "invalid_request_error"


# ------------------------------------------------------------------------------ function calls
@pytest.fixture(scope="module")
def scripted_engine(qwen3_fixture_pair):
    return ScriptedEngine(qwen3_fixture_pair, weather_script)


@pytest.fixture(scope="module")
def scripted(scripted_engine):
    with serve(scripted_engine) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


ASK = dict(model="any", input="Weather in Paris?", tools=[WEATHER_TOOL])
ANSWER = WEATHER_ANSWER.split("\n\n")[-1]


def _check_call(response) -> str:
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    thought, call = response.output
    assert thought.content[0].text.strip() == WEATHER_CALL.split("\n")[1]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris"}'
    assert response.status == "completed"
    return call.call_id


@pytest.mark.parametrize("streamed", [False, True])
def test_function_call_round_trip_by_previous_response_id(scripted, streamed):
    if streamed:  # (the client's stream helper, which wants `response.completed`)
        with scripted.responses.stream(**ASK) as stream:
            kinds = {e.type for e in stream}
            first = stream.get_final_response()
        assert {"response.reasoning_text.delta", "response.function_call_arguments.done"} <= kinds
    else:
        first = scripted.responses.create(**ASK)
    call_id = _check_call(first)
    output = {"type": "function_call_output", "call_id": call_id, "output": TOOL_OUTPUT}
    second = scripted.responses.create(
        model="any", input=[output], previous_response_id=first.id, tools=[WEATHER_TOOL]
    )
    assert second.output_text == ANSWER and second.output[0].type == "reasoning"


def test_function_call_round_trip_without_stored_state(scripted):
    """As a client with `store: false` does it: the output items sent back, reasoning in the
    opaque `encrypted_content` it asked for."""
    include = ["reasoning.encrypted_content"]
    first = scripted.responses.create(**ASK, store=False, include=include)
    call_id = _check_call(first)
    thought = first.output[0].model_dump(exclude_none=True)
    thought.pop("content")  # what a client that keeps only the opaque part sends
    assert thought["encrypted_content"]
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        thought,
        first.output[1].model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call_id, "output": TOOL_OUTPUT},
    ]
    second = scripted.responses.create(model="any", input=items, tools=[WEATHER_TOOL], store=False)
    assert second.output_text == ANSWER


def test_one_call_at_a_time_and_tools_off(scripted):
    assert _check_call(scripted.responses.create(**ASK, parallel_tool_calls=False))
    off = scripted.responses.create(**ASK, tool_choice="none")
    assert [item.type for item in off.output] == ["reasoning", "message"]
    assert "<tool_call>" in off.output_text


def test_items_become_template_messages(scripted, scripted_engine):
    """Instructions first; developer messages as system; reasoning, message and call items of
    one assistant turn in one template message."""
    items = [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Ask."}]},
        {"role": "assistant", "content": "Asking."},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": TOOL_OUTPUT},
    ]
    r = scripted.responses.create(model="any", input=items, instructions="Be kind.")
    assert r.output_text == ANSWER
    assert scripted_engine.prompts[-1] == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>system\nRules.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\nAsking.<|im_end|>\n"  # (this template writes no calls)
        f"<|im_start|>tool\n{TOOL_OUTPUT}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
