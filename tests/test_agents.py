"""An agent framework from the package index, the OpenAI Agents SDK (`openai-agents`), runs its
tool loop against the server on 127.0.0.1 over the Responses API: the model calls a tool, the
framework runs it and sends the result back, the model answers from it. The answers come from a
scripted engine (the tiny model calls no tools); everything between the framework and the engine
is the real server."""

from __future__ import annotations

import asyncio

import agents
import openai
import pytest
from served import KEY, TOOL_OUTPUT, WEATHER_ANSWER, ScriptedEngine, serve, weather_script


@pytest.fixture(scope="module")
def scripted(qwen3_fixture_pair):
    engine = ScriptedEngine(qwen3_fixture_pair, weather_script)
    with serve(engine) as url:
        yield url, engine


def _agent(url: str, calls: list[str]):
    agents.set_tracing_disabled(True)  # (tracing would post to OpenAI)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return TOOL_OUTPUT

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    model = agents.OpenAIResponsesModel(model="tiny", openai_client=client)
    return agents.Agent(
        name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_runs_a_two_step_tool_loop(scripted, streamed):
    url, engine = scripted
    calls: list[str] = []
    agent = _agent(url, calls)
    before = len(engine.prompts)

    async def run():
        if not streamed:
            return await agents.Runner.run(agent, "Weather in Paris?")
        result = agents.Runner.run_streamed(agent, "Weather in Paris?")
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert calls == ["Paris"]
    assert result.final_output == WEATHER_ANSWER.split("\n\n")[-1]
    assert len(engine.prompts) - before == 2  # the call, then the answer
    assert TOOL_OUTPUT in engine.prompts[-1]
