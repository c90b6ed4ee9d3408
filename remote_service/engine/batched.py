"""Engine lifecycle shared by the real and the mock engine: load, warm up, serve, stop."""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from remote_service.engine.base import (
    Engine,
    EngineHealth,
    EngineInfo,
    EngineLoadError,
    EngineNotReadyError,
    EngineObserver,
    EngineState,
    EngineStats,
    GenerationDefaults,
    GenerationRequest,
    SamplingParams,
)
from remote_service.engine.scheduler import BatchRunner, BatchScheduler, DeltaStream
from remote_service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """What a backend hands back from :meth:`BatchedEngine._load_model`."""

    runner: BatchRunner
    eos_ids: Iterable[int]
    info: EngineInfo
    defaults: GenerationDefaults


class BatchedEngine(Engine):
    """Runs a :class:`BatchRunner` on a :class:`BatchScheduler`; subclasses load the model."""

    def __init__(self, settings: Settings, observer: EngineObserver | None = None) -> None:
        self.settings = settings
        self._observer = observer
        self._state = EngineState.LOADING
        self._detail: str | None = None
        self._scheduler: BatchScheduler | None = None
        self._info = EngineInfo(
            backend=settings.backend,
            model_name=settings.served_model_name,
            quantization=settings.quantization,
            max_num_seqs=settings.max_num_seqs,
        )
        self._defaults = GenerationDefaults()

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def defaults(self) -> GenerationDefaults:
        return self._defaults

    @abstractmethod
    def _load_model(self) -> Loaded: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    def load(self) -> None:
        started = time.perf_counter()
        try:
            loaded = self._load_model()
            load_s = time.perf_counter() - started
            self._info = replace(loaded.info, load_time_s=round(load_s, 3))
            self._defaults = loaded.defaults
            self._scheduler = BatchScheduler(
                loaded.runner,
                decode=self._decode,
                eos_ids=loaded.eos_ids,
                max_num_seqs=self.settings.max_num_seqs,
                max_queue=self.settings.max_queue,
                max_model_len=self._info.max_model_len,
                observer=self._observer,
                name=self._info.backend,
            )
            self._scheduler.start()
            warm_s = self._warm_up() if self.settings.warmup else None
        except Exception as exc:
            self._state = EngineState.ERROR
            self._detail = str(exc) if isinstance(exc, EngineLoadError) else repr(exc)
            raise
        self._info = replace(self._info, warmup_time_s=None if warm_s is None else round(warm_s, 3))
        self._state = EngineState.READY
        log.info(
            "model %s ready: backend=%s device=%s dtype=%s quantization=%s load=%.2fs warmup=%s",
            self._info.model_name,
            self._info.backend,
            self._info.device,
            self._info.dtype,
            self._info.quantization,
            load_s,
            "off" if warm_s is None else f"{warm_s:.2f}s",
        )

    def _warm_up(self) -> float:
        """One short generation through the whole path (kernels, allocator) before 'ready'."""
        import asyncio

        started = time.perf_counter()
        ids = self.encode("Hello", add_special_tokens=True) or [0]
        request = GenerationRequest("warmup", ids, SamplingParams(max_tokens=4, temperature=0.0))

        async def run() -> None:
            assert self._scheduler is not None
            async for _ in self._scheduler.submit(request):
                pass

        asyncio.run(run())
        return time.perf_counter() - started

    def health(self) -> EngineHealth:
        sched = self._scheduler
        if self._state is EngineState.READY and sched is not None and not sched.alive:
            return EngineHealth(EngineState.ERROR, sched.fatal_error or "stopped")
        return EngineHealth(self._state, self._detail)

    def stats(self) -> EngineStats:
        return self._scheduler.stats() if self._scheduler else EngineStats()

    async def stream(self, request: GenerationRequest) -> DeltaStream:
        if self._state is not EngineState.READY or self._scheduler is None:
            raise EngineNotReadyError(f"the model is {self.health().state.value}")
        return self._scheduler.submit(request)

    def shutdown(self, timeout: float) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(timeout)
        self._state = EngineState.STOPPED

    def describe(self) -> dict[str, Any]:
        return {"state": self._state.value, "detail": self._detail}
