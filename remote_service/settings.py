"""Server settings, read from ``ASOBA_*`` environment variables (the unit's EnvironmentFile).

Every field ``foo_bar`` is the variable ``ASOBA_FOO_BAR``. Empty values count as unset, so an
EnvironmentFile line ``ASOBA_API_KEY=`` means "no key". Unknown ``ASOBA_*`` variables are
reported with a "did you mean" hint (logged, not fatal: other tools share the prefix).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "ASOBA_"

Backend = Literal["transformers", "mock", "vllm"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Quantization = Literal["none", "bnb-4bit", "bnb-8bit", "awq"]
Reasoning = Literal["keep", "split"]
LogLevel = Literal["debug", "info", "warning", "error"]
Switch = Literal["auto", "on", "off"]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class SettingsError(ValueError):
    """Invalid settings; ``str()`` is one ``ASOBA_NAME: reason`` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class Settings(BaseModel):
    """What the server needs to start. Build it with :meth:`from_env` in production."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path | None = Field(None, description="Directory with config.json + safetensors")
    model_name: str | None = Field(None, description="Served model id (default: dir name)")
    backend: Backend = Field(
        "transformers",
        description="transformers (in-process), vllm (a vLLM child server), mock (no model)",
    )
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda[:N]")
    dtype: DType = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    quantization: Quantization = "none"
    host: str = "0.0.0.0"  # noqa: S104 - the monitor polls the host from outside
    port: int = Field(8000, ge=1, le=65535)
    max_num_seqs: int = Field(16, ge=1, le=1024, description="Sequences decoded together")
    max_queue: int = Field(64, ge=0, le=100_000, description="Requests waiting for a slot")
    max_new_tokens: int = Field(2048, ge=1, description="Cap on max_tokens of a request")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request omits it")
    max_model_len: int | None = Field(None, ge=16, description="Context cap (default: model's)")
    prefill_chunk: int = Field(
        512, ge=16, le=65_536, description="Prompt tokens prefilled per step, between decode steps"
    )
    max_prompt_chars: int = Field(1_000_000, ge=1, description="Reject longer prompts early")
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Request body cap (413 beyond)"
    )
    request_timeout: float = Field(
        30.0, gt=0, le=3600, description="Seconds a client has to send a whole request"
    )
    max_connections: int = Field(
        1024, ge=1, le=60_000, description="Open connections; 503 with Retry-After beyond"
    )
    api_docs: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json (off: less to probe)"
    )
    cors_origins: str | None = Field(
        None, description="Comma-separated origins allowed by CORS ('*': any); default: none"
    )
    api_key: SecretStr | None = Field(None, description="Bearer key for /generate and /v1/*")
    reasoning: Reasoning = Field("keep", description="'split' moves <think> to reasoning_content")
    shutdown_timeout: float = Field(20.0, ge=0, le=3600, description="SIGTERM grace, seconds")
    warmup: bool = True
    log_level: LogLevel = "info"
    mock_token_delay: float = Field(0.005, ge=0, le=10, description="Mock: seconds per token")
    # --- ASOBA_BACKEND=vllm (remote_service/engine/vllm_child.py) ---
    vllm_python: Path | None = Field(
        None, description="vllm: the Python of vLLM's own venv (required with backend vllm)"
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vllm: share of GPU memory vLLM may take (CUDA only)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=16, description="vllm: GPUs per model")
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="vllm: KV cache budget in bytes (CPU: whole GiB, at least 1)"
    )
    vllm_enforce_eager: Switch = Field(
        "auto", description="vllm: no compilation (auto: on CPU without a C++ compiler)"
    )
    vllm_socket: Path | None = Field(
        None, description="vllm: the child's unix socket (default: $RUNTIME_DIRECTORY/vllm.sock)"
    )
    vllm_tool_call_parser: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="vllm: the model's tool-call parser (tools and tool_choice need one)",
    )
    vllm_start_timeout: float = Field(
        900.0, gt=0, le=86_400, description="vllm: seconds the child has to become ready"
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        return _DTYPE_ALIASES.get(v.lower(), v.lower()) if isinstance(v, str) else v

    @field_validator(
        "quantization", "backend", "reasoning", "log_level", "vllm_enforce_eager", mode="before"
    )
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.lower()
        if not _DEVICE_RE.match(v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        if self.backend != "mock" and self.model_dir is None:
            raise ValueError("ASOBA_MODEL_DIR is required unless ASOBA_BACKEND=mock")
        if self.backend == "vllm" and self.vllm_python is None:
            raise ValueError(
                "ASOBA_VLLM_PYTHON is required with ASOBA_BACKEND=vllm: the python of the "
                "venv vLLM is installed in (e.g. /opt/vllm/bin/python)"
            )
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError("ASOBA_DEFAULT_MAX_TOKENS must not exceed ASOBA_MAX_NEW_TOKENS")
        if self.quantization != "none" and self.device == "cpu":
            raise ValueError(
                f"ASOBA_QUANTIZATION={self.quantization} needs a CUDA GPU, "
                "but ASOBA_DEVICE=cpu; use ASOBA_QUANTIZATION=none on CPU"
            )
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model_dir is not None:
            return self.model_dir.resolve().name
        return "mock"

    @classmethod
    def env_names(cls) -> list[str]:
        return [ENV_PREFIX + name.upper() for name in cls.model_fields]

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from ``environ``; raise :class:`SettingsError` with one line per fault."""
        data: dict[str, str] = {}
        for name in cls.model_fields:
            value = environ.get(ENV_PREFIX + name.upper(), "").strip()
            if value:
                data[name] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to show: the API key is reduced to whether one is set."""
        out = self.model_dump(mode="json", exclude={"api_key"})
        out["api_key_set"] = self.api_key is not None
        return out


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``ASOBA_*`` names that are no setting, each with a suggestion where one is close."""
    known = Settings.env_names()
    out = []
    for key in sorted(environ):
        if key.startswith(ENV_PREFIX) and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            out.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return out


def _describe(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if loc:
            problems.append(f"{ENV_PREFIX}{loc[0].upper()}: {msg}")
        else:
            problems.append(msg)
    return problems
