"""Servers for the tests of the agent-facing APIs (Messages, Responses, agent frameworks): uvicorn
on a free port of 127.0.0.1 in a thread of this process, in front of either the tiny fixture
pair or a `ScriptedEngine`.

The tiny pair writes random text, never a tool call. A `ScriptedEngine` answers from a script
instead (a function of the rendered prompt), streamed in small pieces through the real engine
worker, queue and HTTP layers, so that clients can be shown tool calls and thinking."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from mlx_specdec.generate import GenerationChunk, GenerationResult
from mlx_specdec.loading import PairConfig
from mlx_specdec.prefix_cache import PrefixCache
from mlx_specdec.server.app import ServerSettings, create_app
from mlx_specdec.server.engine import Engine, Job

KEY = "agents-key"
Script = Callable[[str], str]  # rendered prompt -> the answer's raw text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScriptedEngine(Engine):
    """An engine whose answers come from `script` (the target only tokenizes and sizes)."""

    def __init__(self, pair: tuple, script: Script, piece: int = 5) -> None:
        target, tokenizer, _, config = pair
        super().__init__(target, tokenizer, None, PairConfig(mode="baseline", target=config.target))
        self.script, self.piece = script, piece
        self.prompts: list[str] = []  # every prompt it was given, rendered

    def _generate(self, job: Job) -> GenerationResult:
        self.prompts.append(self.tokenizer.decode(job.ids))
        text = self.script(self.prompts[-1])
        tokens = list(self.tokenizer.encode(text, add_special_tokens=False))
        cache = {"prefix_cache": "off", "cached_tokens": 0}
        for i in range(0, len(text), self.piece):
            if job.cancel.is_set():
                break
            job.put(GenerationChunk(text[i : i + self.piece], [], cache_info=cache))
        return GenerationResult(
            text=text,
            tokens=tokens,
            rounds=[],
            prompt_tokens=len(job.ids),
            prefill_seconds=0.001,
            decode_seconds=0.001,
            finish_reason="stop",
            mode="baseline",
            **cache,
        )


@contextlib.contextmanager
def serve(engine: Engine, **settings: Any) -> Iterator[str]:
    """The app around `engine` on 127.0.0.1 (key `KEY`); yields its base URL."""
    options = {"model_name": "tiny", "api_key": KEY, "default_max_tokens": 128, **settings}
    app = create_app(engine, ServerSettings(**options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def pair_engine(pair: tuple, prefix_cache: bool = True) -> Engine:
    """An engine on the loaded pair, the full draft block (as `speculative_generate`), with a
    prefix cache unless told otherwise (every prompt then prefilled as a cold run does it)."""
    target, tokenizer, drafter, config = pair
    cache = PrefixCache(max_ram_mb=256, spill_dir=None) if prefix_cache else None
    return Engine(target, tokenizer, drafter, config, max_queue=4, prefix_cache=cache)


# A tool loop, as the tests' scripts write it (Qwen3's formats: the fixture tokenizer's).
WEATHER_CALL = (
    "<think>\nThe user wants the weather; I will ask the tool.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
WEATHER_ANSWER = "<think>\nThe tool answered.\n</think>\n\nIt is sunny in Paris, 22 degrees."
TOOL_OUTPUT = "sunny, 22 degrees"


def weather_script(prompt: str) -> str:
    """Call `get_weather` until the prompt holds its result, then answer from it."""
    last_user = prompt.rfind("<|im_start|>user")
    return WEATHER_ANSWER if TOOL_OUTPUT in prompt[last_user:] else WEATHER_CALL
