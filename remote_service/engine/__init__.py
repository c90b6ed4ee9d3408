"""Engines: the serving logic behind the routes (see :mod:`remote_service.engine.base`)."""

from __future__ import annotations

from remote_service.engine.base import (
    Delta,
    Engine,
    EngineError,
    EngineHealth,
    EngineInfo,
    EngineLoadError,
    EngineNotReadyError,
    EngineObserver,
    EngineState,
    EngineStats,
    GenerationDefaults,
    GenerationFailedError,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    SamplingParams,
)
from remote_service.settings import Settings


def build_engine(settings: Settings, observer: EngineObserver | None = None) -> Engine:
    """The engine ``settings.backend`` names (torch is imported only for transformers)."""
    if settings.backend == "mock":
        from remote_service.engine.mock import MockEngine

        return MockEngine(settings, observer)
    if settings.backend == "vllm":
        # httpx only: vLLM runs in its own venv, as a child server.
        from remote_service.engine.vllm_engine import VllmEngine

        return VllmEngine(settings)
    from remote_service.engine.transformers_engine import TransformersEngine

    return TransformersEngine(settings, observer)


__all__ = [
    "Delta",
    "Engine",
    "EngineError",
    "EngineHealth",
    "EngineInfo",
    "EngineLoadError",
    "EngineNotReadyError",
    "EngineObserver",
    "EngineState",
    "EngineStats",
    "GenerationDefaults",
    "GenerationFailedError",
    "GenerationRequest",
    "GenerationResult",
    "QueueFullError",
    "SamplingParams",
    "build_engine",
]
