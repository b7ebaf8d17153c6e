"""Request bodies of the Anthropic Messages API subset this server speaks (`/v1/messages` and
its `count_tokens`). Content blocks are one loose model checked when the conversation is built
(`messages.py`), so that a block this server cannot read gets one clear message naming it.
Strict types and bounds as in `schemas.py`; fields that would change the answer and cannot be
honoured are refused."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .schemas import MAX_INT, Count, JsonObject, SamplingExtras, StrictModel, check_stops


class ResultPart(StrictModel):
    """A block inside a `tool_result`'s content (only text is read)."""

    type: str = Field(max_length=64)
    text: str | None = None


class ContentBlock(StrictModel):
    """Any content block: `text`, `thinking`, `tool_use`, `tool_result` are read; the rest are
    refused by name."""

    type: str = Field(max_length=64)
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    id: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    input: JsonObject | None = None
    tool_use_id: str | None = Field(default=None, max_length=256)
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None


class InputMessage(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class SystemBlock(StrictModel):
    type: Literal["text"] = "text"
    text: str


class AnthropicTool(StrictModel):
    """A client tool; Anthropic's own tools (bash, web search, ...) have another `type`."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: JsonObject


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(StrictModel):
    """Thinking on (`enabled`, `adaptive`, `between_tools`) or off. `budget_tokens` is advisory
    (as Anthropic's own budget is a target); `display: omitted` sends thinking blocks with no
    text, only the signature that carries it back."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    display: Literal["summarized", "omitted"] | None = None


class OutputConfig(StrictModel):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # advisory
    format: Any = None  # structured output: refused


class MessagesPrompt(StrictModel):
    """What makes the prompt: the body of `count_tokens`, and the base of a Messages request."""

    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[SystemBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    # Refused when given: each would change the answer, and none can be honoured here.
    mcp_servers: list[Any] | None = None
    container: Any = None
    context_management: Any = None
    output_format: Any = None

    @model_validator(mode="after")
    def _check_prompt(self) -> MessagesPrompt:
        if self.tool_choice and self.tool_choice.type in ("any", "tool"):
            raise ValueError(
                f"tool_choice: type {self.tool_choice.type!r} is not supported (decoding is not "
                "constrained); use 'auto' or 'none'"
            )
        for name in ("mcp_servers", "container", "context_management", "output_format"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: not supported by this server")
        if self.output_config and self.output_config.format is not None:
            raise ValueError("output_config.format: structured output is not supported")
        return self

    def thinking_omitted(self) -> bool:
        return bool(self.thinking and self.thinking.display == "omitted")


class MessagesRequest(MessagesPrompt, SamplingExtras):
    max_tokens: Count
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _check_sampling(self) -> MessagesRequest:
        check_stops(self.stop_sequences or [], "stop_sequences")
        return self
