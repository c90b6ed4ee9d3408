"""Request and response models of every endpoint (pydantic; these pin the wire format).

Requests are strict (no "16" for 16). Unknown fields are ignored, as vLLM does: clients send
fields this server has never heard of (the OpenAI SDK's ``store``, ``metadata``,
``service_tier``, ...). Each request notes what it ignored (``ignored_fields()``), the answer
names them in ``x-ignored-fields`` and the server logs each name once. OpenAI fields this
server knows but does not implement are declared, with their default as the only value the
schema admits, so a client sending the default works and anything else is a clear 400 naming
the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from remote_service.api.monitor import MonitorStatus

# --- common ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


MAX_IGNORED_NOTED = 32  # names per request kept for the header and the log


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    _ignored: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _note_ignored(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        model = handler(data)
        if isinstance(data, dict) and isinstance(model, _Request):
            known = set(cls.model_fields)
            unknown = [str(k) for k in data if k not in known][:MAX_IGNORED_NOTED]
            model._ignored = unknown
        return model

    def ignored_fields(self) -> list[str]:
        """Dotted names of the fields this request sent and the server ignored."""
        out = list(self._ignored)
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, _Request):
                    suffix = "[]" if isinstance(value, list) else ""
                    out += [f"{name}{suffix}.{sub}" for sub in item.ignored_fields()]
        return list(dict.fromkeys(out))[:MAX_IGNORED_NOTED]


def _integral(value: Any) -> Any:
    """JSON Schema's integer admits 5.0: take a whole float as the integer it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integer fields, strict otherwise ("5" and true stay errors). The bounds go before the
# validator so that the OpenAPI document states them as minimum/maximum.
_WHOLE = BeforeValidator(_integral)
MaxTokensInt = Annotated[int, Field(ge=1), _WHOLE]
SeedInt = Annotated[int, Field(ge=0, le=2**53), _WHOLE]
TopKInt = Annotated[int, Field(ge=-1, le=100_000), _WHOLE]
OnlyOne = Annotated[int, Field(ge=1, le=1), _WHOLE]
OnlyZero = Annotated[int, Field(ge=0, le=0), _WHOLE]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1), _WHOLE]

MAX_STOP_CHARS = 256
MAX_PROMPTS = 32

Temperature = Field(None, ge=0.0, le=2.0, description="0 is greedy; default: the model's")
TopP = Field(None, gt=0.0, le=1.0)
TopK = Field(None, description="-1 or 0: off")
RepetitionPenalty = Field(None, gt=0.0, le=2.0)
MaxTokens = Field(None, description="Capped by the server's ASOBA_MAX_NEW_TOKENS")
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = Field(
    None,
    description=f"Up to 4 sequences of at most {MAX_STOP_CHARS} characters where generation "
    "stops (not returned)",
)
StopField = StopText | Annotated[list[StopText], Field(max_length=4)] | None
# 2**53: the largest integer a JSON number carries exactly (an int64 bound reads back rounded).
Seed = Field(None)
PromptText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


# --- /generate (the monitor/MCP format) --------------------------------------------------------


class GenerateRequest(_Request):
    prompt: str = Field(..., min_length=1)
    max_tokens: MaxTokensInt | None = MaxTokens
    temperature: float | None = Temperature
    top_p: float | None = TopP
    stop: StopField = Stop
    seed: SeedInt | None = Seed


class GenerateChoice(BaseModel):
    text: str
    finish_reason: str


class GenerateResponse(BaseModel):
    choices: list[GenerateChoice]
    usage: Usage
    model: str
    created: int
    id: str


# --- /v1/completions ---------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="usage in every chunk (vLLM's)")


class _SamplingFields(_Request):
    model: str | None = Field(None, description="Must be the served model's id if given")
    max_tokens: MaxTokensInt | None = MaxTokens
    temperature: float | None = Temperature
    top_p: float | None = TopP
    top_k: TopKInt | None = TopK
    repetition_penalty: float | None = RepetitionPenalty
    stop: StopField = Stop
    seed: SeedInt | None = Seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    # Declared so that OpenAI clients sending the defaults work; the schema admits only them.
    n: OnlyOne = Field(1, description="Only 1 is supported")
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="Only 0")
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="Only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Only {}")
    min_tokens: OnlyZero = Field(0, description="vLLM's; only 0 is supported")


class CompletionRequest(_SamplingFields):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(
        ...,
        description=f"A prompt, a list of up to {MAX_PROMPTS} prompts, token ids, or a list of "
        "token-id prompts: one choice per prompt",
    )
    echo: Literal[False] = Field(False, description="Only false is supported")
    logprobs: None = Field(None, description="Not supported")
    best_of: OnlyOne | None = Field(None, description="Only 1")
    suffix: None = Field(None, description="Not supported")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- /v1/chat/completions ----------------------------------------------------------------------


class ContentPart(_Request):
    type: Literal["text"] = Field(description="Only text parts are supported")
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: None = Field(None, description="Not supported")
    reasoning_content: str | None = None


class ToolMessage(_Request):
    """The answer to a tool call: its content and the id of the call it answers."""

    role: Literal["tool"]
    content: str | list[ContentPart]
    tool_call_id: str = Field(min_length=1)
    name: str | None = None


Message = Annotated[ChatMessage | ToolMessage, Field(discriminator="role")]


class ResponseFormat(_Request):
    type: Literal["text"] = Field(description="Only 'text' is supported")


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: MaxTokensInt | None = MaxTokens
    logprobs: Literal[False] = Field(False, description="Only false is supported")
    top_logprobs: OnlyZero | None = Field(None, description="Only 0")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported")
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to the chat template, e.g. {'enable_thinking': false}"
    )


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="Only with ASOBA_REASONING=split")

    @model_serializer(mode="wrap")
    def _drop_empty_reasoning(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("reasoning_content") is None:
            data.pop("reasoning_content", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# --- /v1/models ------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "asoba"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- health, status, info ---------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "error"]
    timestamp: str | None = None
    detail: str | None = None


class LivenessResponse(BaseModel):
    status: Literal["alive"] = "alive"
    timestamp: str


# The first eight fields are the monitor's (MonitorStatus, remote_service/api/monitor.py).
class StatusResponse(MonitorStatus):
    """The format the external uptime monitor polls (first eight fields), plus extras."""

    backend: str
    device: str
    dtype: str
    quantization: str
    gpu_name: str | None = None
    ram_total_gb: float
    process_rss_gb: float
    uptime_s: float
    load_time_s: float | None
    warmup_time_s: float | None
    requests_running: int
    requests_waiting: int
    requests_finished: int
    tokens_generated: int
    tokens_per_s: float
    max_num_seqs: int
    max_model_len: int
    detail: str | None = None
    engine: str | None = Field(None, description="what generates: transformers, vllm or mock")


class InfoResponse(BaseModel):
    service: str
    version: str
    model: str
    status: str
    backend: str
    device: str
    dtype: str
    quantization: str
    max_model_len: int
    max_num_seqs: int
    max_new_tokens: int
    reasoning: str
    auth: bool
    versions: dict[str, str]
    endpoints: list[str]
