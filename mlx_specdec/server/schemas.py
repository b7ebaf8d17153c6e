"""Request bodies of the OpenAI API subset this server speaks (the OpenAPI schema comes from
these). Unknown fields are ignored, as OpenAI clients send many; a known field this server cannot
honour is refused rather than silently dropped.

Types are strict: `true` is no integer and `"yes"` no boolean. Integers are bounded, and free-form
JSON (tool schemas, arguments, template variables) is bounded in depth, so that nothing later
recurses too deep on it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..prompts import MAX_DEPTH
from ..safejson import nesting_depth, object_depth

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_INT = 2**31 - 1  # counts: tokens, top_k
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")
CONTEXT_SIZES = ("repetition_context_size", "presence_context_size", "frequency_context_size")


def _shallow(value: Any) -> Any:
    if object_depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _shallow_json(text: str) -> str:
    if nesting_depth(text) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return text


def check_stops(stops: list[str], name: str = "stop") -> None:
    """At most `MAX_STOP_SEQUENCES` stop sequences of 1 to `MAX_STOP_CHARS` characters."""
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"{name}: at most {MAX_STOP_SEQUENCES} sequences")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"{name}: each sequence must have 1 to {MAX_STOP_CHARS} characters")


JsonObject = Annotated[dict[str, Any], AfterValidator(_shallow)]
JsonText = Annotated[str, AfterValidator(_shallow_json)]
Count = Annotated[int, Field(ge=1, le=MAX_INT)]


class StrictModel(BaseModel):
    """A request body, or a part of one: strict types, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class FunctionDef(StrictModel):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: JsonObject | None = None


class Tool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class FunctionCall(StrictModel):
    name: str
    arguments: JsonText = "{}"


class ToolCallIn(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(StrictModel):
    type: str
    text: str | None = None


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class SamplingExtras(StrictModel):
    """Sampling fields this server takes on every API, also where the API has none of them:
    the sampler's, and the penalties (mlx-lm's logits processors, each over the last
    `*_context_size` tokens, prompt included; mlx-lm's server names them the same way)."""

    top_k: int | None = Field(default=None, ge=0, le=MAX_INT, description="0: off")
    min_p: float | None = Field(default=None, ge=0, lt=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="same seed, same output")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100, description="1: off")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string) -> added logit, -100 to 100"
    )
    repetition_context_size: Count | None = None
    presence_context_size: Count | None = None
    frequency_context_size: Count | None = None

    @model_validator(mode="after")
    def _check_penalties(self) -> SamplingExtras:
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens")
        if not all(k.isascii() and k.isdigit() and len(k) < 10 for k in bias):
            raise ValueError("logit_bias: keys must be token ids, as strings")
        if any(not -100 <= v <= 100 for v in bias.values()):
            raise ValueError("logit_bias: values must be from -100 to 100")
        if len({getattr(self, n) for n in CONTEXT_SIZES} - {None}) > 1:
            raise ValueError(
                ", ".join(CONTEXT_SIZES) + ": one context size serves every penalty here; "
                "give the same value"
            )
        return self

    def penalty_options(self) -> dict[str, Any]:
        """The engine's options for the penalties given (none: the request stays batchable)."""
        out: dict[str, Any] = {n: getattr(self, n) for n in PENALTIES if getattr(self, n)}
        if self.logit_bias:
            out["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        sizes = {getattr(self, n) for n in CONTEXT_SIZES} - {None}
        if out and sizes:
            out["penalty_context_size"] = sizes.pop()
        return out

    def logprob_options(self) -> dict[str, Any]:
        """The engine's options for the log-probabilities asked for (none by default)."""
        return {}


class SamplingFields(SamplingExtras):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: Count | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = False  # OpenAI allows null: not streamed
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_INT, description="only 1 is supported")

    @model_validator(mode="after")
    def _check(self) -> SamplingFields:
        if self.n != 1:
            raise ValueError("n: must be 1 (this server returns one choice per request)")
        check_stops(self.stop_list())
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="false: one call at most")
    enable_thinking: bool | None = None
    chat_template_kwargs: JsonObject | None = None
    response_format: JsonObject | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only type text is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError(
                "tool_choice: 'required' or a named function is not supported (decoding is not "
                "constrained); use 'auto' or 'none'"
            )
        return self

    def logprob_options(self) -> dict[str, Any]:
        if not self.logprobs:
            return {}
        return {"logprobs": True, "top_logprobs": self.top_logprobs or 0}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(
        description="a string, a list with one string, or token ids"
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="how many top tokens to add"
    )
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_INT)

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        texts = isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str)
        if texts and len(self.prompt) != 1:
            raise ValueError("prompt: give one string (batches are not supported)")
        if not self.prompt or self.prompt == [""]:
            raise ValueError("prompt: is empty")
        if self.echo or self.suffix:
            raise ValueError("echo, suffix: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: must be 1")
        return self

    def logprob_options(self) -> dict[str, Any]:
        if self.logprobs is None:
            return {}
        return {"logprobs": True, "top_logprobs": self.logprobs}
