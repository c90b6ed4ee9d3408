"""Request and response models of every endpoint (pydantic; these pin the wire format).

Requests are strict (no "16" for 16) and reject unknown fields, as OpenAI does. OpenAI fields
this server does not implement are declared so that their default is accepted and anything
else is a clear 400 naming the field (see ``serving.reject_unsupported``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

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


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Temperature = Field(None, ge=0.0, le=2.0, description="0 is greedy; default: the model's")
TopP = Field(None, gt=0.0, le=1.0)
TopK = Field(None, ge=-1, le=100_000, description="-1 or 0: off")
RepetitionPenalty = Field(None, gt=0.0, le=2.0)
MaxTokens = Field(None, ge=1, description="Capped by the server's ASOBA_MAX_NEW_TOKENS")
Stop = Field(None, description="Up to 4 sequences where generation stops (not returned)")
Seed = Field(None, ge=0, le=2**63 - 1)


# --- /generate (the monitor/MCP format) --------------------------------------------------------


class GenerateRequest(_Request):
    prompt: str = Field(..., min_length=1)
    max_tokens: int | None = MaxTokens
    temperature: float | None = Temperature
    top_p: float | None = TopP
    stop: str | list[str] | None = Stop
    seed: int | None = Seed


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


class _SamplingFields(_Request):
    model: str | None = Field(None, description="Must be the served model's id if given")
    max_tokens: int | None = MaxTokens
    temperature: float | None = Temperature
    top_p: float | None = TopP
    top_k: int | None = TopK
    repetition_penalty: float | None = RepetitionPenalty
    stop: str | list[str] | None = Stop
    seed: int | None = Seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    # Declared so that OpenAI clients sending the defaults work; other values are refused.
    n: int = Field(1, ge=1, description="Only 1 is supported")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(..., description="One prompt (a list of exactly one)")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


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


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = MaxTokens
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
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


class StatusResponse(BaseModel):
    """The format the external uptime monitor polls (first eight fields), plus extras."""

    status: Literal["healthy", "loading", "error", "stopped"]
    model: str
    gpu_memory_used: int = Field(description="MiB, all GPUs; 0 without a GPU")
    gpu_memory_total: int = Field(description="MiB, all GPUs; 0 without a GPU")
    ram_usage_gb: float = Field(description="Host RAM in use, GiB")
    port: int
    timestamp: str
    service: Literal["asoba-inference"] = "asoba-inference"
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
