"""Request bodies of the OpenAI Responses API subset this server speaks (`/v1/responses`). Input
items are one loose model checked when the conversation is built (`responses.py`), so that an
item this server cannot read gets one clear message naming it. Strict types and bounds as in
`schemas.py`; fields that would change the answer and cannot be honoured are refused."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .schemas import MAX_TOP_LOGPROBS, Count, JsonObject, JsonText, SamplingExtras, StrictModel

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
ENCRYPTED_REASONING = "reasoning.encrypted_content"  # `include` values this server fills
TEXT_LOGPROBS = "message.output_text.logprobs"


class InputPart(StrictModel):
    """A content part: `input_text`, `output_text`, `refusal`, `reasoning_text`,
    `summary_text` are read."""

    type: str = Field(max_length=64)
    text: str | None = None
    refusal: str | None = None


class InputItem(StrictModel):
    """Any input item: `message` (the default when a `role` is given), `function_call`,
    `function_call_output` and `reasoning` are read; the rest are refused by name."""

    type: str | None = Field(default=None, max_length=64)
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    id: str | None = Field(default=None, max_length=256)
    call_id: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    arguments: JsonText | None = None
    output: str | list[InputPart] | None = None
    summary: list[InputPart] | None = None
    encrypted_content: str | None = None


class FunctionTool(StrictModel):
    """A function tool; the Responses API's built-in tools (web search, ...) have another
    `type`. `strict` is accepted, but arguments are not constrained to the schema."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class ReasoningConfig(StrictModel):
    effort: Literal[EFFORTS] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(StrictModel):
    type: str = Field(max_length=64)


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(SamplingExtras):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: Count | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | JsonObject | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="false: one call at most")
    max_tool_calls: Count | None = None
    previous_response_id: str | None = Field(default=None, max_length=256)
    store: bool = True
    stream: bool | None = False  # OpenAI allows null: not streamed
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    # Refused when given: each would change the answer, and none can be honoured here.
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input: is empty")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError(
                "tool_choice: 'required' or a named tool is not supported (decoding is not "
                "constrained); use 'auto' or 'none'"
            )
        if self.text and self.text.format and self.text.format.type != "text":
            raise ValueError("text.format: only type text is supported")
        if self.truncation == "auto":
            raise ValueError(
                "truncation: 'auto' is not supported (a prompt over the context is "
                "refused, never cut); use 'disabled'"
            )
        if self.background:
            raise ValueError("background: not supported")
        for name in ("conversation", "prompt"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: not supported by this server")
        return self

    def logprob_options(self) -> dict[str, Any]:
        """Log-probabilities of the answer text: asked for by `include` or `top_logprobs`."""
        if not (self.top_logprobs or TEXT_LOGPROBS in (self.include or [])):
            return {}
        return {"logprobs": True, "top_logprobs": self.top_logprobs or 0}

    def thinking(self) -> bool | None:
        """`reasoning.effort` as thinking on or off (None: the server's default)."""
        effort = self.reasoning.effort if self.reasoning else None
        return None if effort is None else effort not in ("none", "minimal")
