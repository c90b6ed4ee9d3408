"""The contract between the HTTP layer and whatever produces tokens.

Routes only ever talk to an :class:`Engine`: ``load`` (blocking, once, at startup), ``generate``
and ``stream`` (async, never block the event loop), ``health`` and ``stats`` (cheap, lock-free
reads). Errors the client caused or can retry are :class:`EngineError` subclasses, each carrying
the HTTP status the API layer answers with.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# --- errors ---------------------------------------------------------------------------------


class EngineError(Exception):
    """Base class; ``status`` and ``type`` shape the OpenAI-style error answer, and a
    ``retry_after_s`` that is not None becomes its ``Retry-After`` header."""

    status: int = 500
    type: str = "server_error"
    retry_after_s: int | None = None


class EngineNotReadyError(EngineError):
    """Loading, draining for a restart, or failed (systemd restarts it): worth a retry later."""

    status = 503
    type = "service_unavailable"
    retry_after_s = 5


class QueueFullError(EngineError):
    """Every slot is busy and the wait queue is full: retry later."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineLoadError(EngineError):
    """The model could not be loaded (bad settings for this host, missing files or packages)."""


class GenerationFailedError(EngineError):
    """The engine failed while decoding this request (e.g. device out of memory)."""


# --- data -------------------------------------------------------------------------------------


class EngineState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, already validated and defaulted by the API layer."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True)
class Delta:
    """One streaming event: new text (may be empty) and, on the last one, the finish reason."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class EngineInfo:
    backend: str
    model_name: str
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str = "none"
    max_model_len: int = 2048
    max_num_seqs: int = 1
    vocab_size: int | None = None  # token ids a prompt may hold are below it (None: any)
    load_time_s: float | None = None
    warmup_time_s: float | None = None
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineHealth:
    state: EngineState
    detail: str | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    requests_finished: int = 0
    tokens_generated: int = 0
    tokens_per_s: float = 0.0  # over the last few seconds


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's own sampling defaults (generation_config.json), used for omitted fields."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


class DeltaIterator(Protocol):
    """What :meth:`Engine.stream` returns."""

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    def __anext__(self) -> Awaitable[Delta]: ...

    def close(self) -> None:
        """Stop generating for this request (idempotent)."""
        ...


class EngineObserver(Protocol):
    """Receives timings from the engine's worker thread (must be thread-safe)."""

    def first_token(self, ttft_s: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(
        self, reason: str, prompt_tokens: int, completion_tokens: int, e2e_s: float, queue_s: float
    ) -> None: ...


# --- the interface ----------------------------------------------------------------------------


class Engine(ABC):
    """Serving logic behind the routes.

    Implementations: TransformersEngine, VllmEngine, MockEngine."""

    @property
    @abstractmethod
    def info(self) -> EngineInfo: ...

    @property
    @abstractmethod
    def defaults(self) -> GenerationDefaults: ...

    @abstractmethod
    def load(self) -> None:
        """Load weights, warm up, start serving. Blocking; call it off the event loop."""

    @abstractmethod
    def health(self) -> EngineHealth: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    async def stream(self, request: GenerationRequest) -> DeltaIterator:
        """Admit ``request`` (raising :class:`QueueFullError` & co. at once) and return an
        iterator of its deltas; closing the iterator frees the slot."""

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (thread-safe; call it off the event loop for long inputs)."""

    @abstractmethod
    def render_chat(
        self, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
    ) -> str:
        """The prompt text of a conversation, with the generation prompt appended; raises
        ValueError when the chat template refuses the conversation."""

    @abstractmethod
    def shutdown(self, timeout: float) -> None:
        """Stop taking requests, let running ones finish for up to ``timeout``, then abort."""

    def fatal(self) -> str | None:
        """Why the process should exit so systemd restarts it (None: it should not). An
        engine that cannot recover in-process (a child server that died) says so here."""
        return None

    async def current_stats(self) -> EngineStats:
        """:meth:`stats` as of now, for ``/status``; an engine whose figures live elsewhere
        (a child server) fetches them here."""
        return self.stats()

    async def extra_metrics(self) -> bytes:
        """More Prometheus text to serve after ours on /metrics (a child server's)."""
        return b""

    async def aclose(self) -> None:  # noqa: B027 - optional: most engines hold nothing
        """Release what the engine holds in the event loop (called at app shutdown)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        parts: list[str] = []
        last: Delta | None = None
        deltas = await self.stream(request)
        try:
            async for delta in deltas:
                parts.append(delta.text)
                last = delta
        finally:
            deltas.close()
        if last is None or last.finish_reason is None:  # pragma: no cover - stream contract
            raise GenerationFailedError("generation ended without a finish reason")
        if last.error:
            if last.finish_reason == "abort":
                raise EngineNotReadyError(last.error)
            raise GenerationFailedError(last.error)
        return GenerationResult(
            text="".join(parts),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        )
