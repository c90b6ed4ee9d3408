"""Device failures and NVML, with fakes (no GPU needed)."""

from __future__ import annotations

import asyncio
import sys
import time
import types

import pytest
from fastapi.testclient import TestClient

from remote_service import gpu
from remote_service.app import create_app
from remote_service.engine import (
    EngineState,
    GenerationFailedError,
    GenerationRequest,
    SamplingParams,
)
from remote_service.engine.batched import Loaded
from remote_service.engine.mock import EchoRunner, MockEngine
from remote_service.engine.scheduler import Sequence
from remote_service.settings import Settings


class BrokenRunner(EchoRunner):
    """Prefill works, every decode step raises like a CUDA OOM would."""

    def decode(self) -> list[tuple[Sequence, int]]:
        raise RuntimeError("CUDA out of memory (simulated)")


class BrokenEngine(MockEngine):
    def _load_model(self) -> Loaded:
        loaded = super()._load_model()
        return Loaded(BrokenRunner(0), loaded.eos_ids, loaded.info, loaded.defaults)


def test_a_failing_step_fails_its_requests_then_the_engine_reports_error() -> None:
    engine = BrokenEngine(Settings(backend="mock", warmup=False))
    engine.load()
    params = SamplingParams(max_tokens=5, temperature=0)

    async def one(i: int) -> None:
        await engine.generate(GenerationRequest(f"f{i}", engine.encode("a b"), params))

    for i in range(3):
        with pytest.raises(GenerationFailedError, match="simulated"):
            asyncio.run(one(i))
    deadline = time.monotonic() + 5
    while engine.health().state is not EngineState.ERROR and time.monotonic() < deadline:
        time.sleep(0.01)
    health = engine.health()
    assert health.state is EngineState.ERROR
    assert "repeated failures" in (health.detail or "")
    engine.shutdown(1)


def test_health_is_503_error_once_the_engine_died() -> None:
    settings = Settings(backend="mock", warmup=False)
    engine = BrokenEngine(settings)
    with TestClient(create_app(settings, engine)) as c:
        deadline = time.monotonic() + 5
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(3):
            r = c.post("/generate", json={"prompt": "a b", "max_tokens": 3})
            assert r.status_code in (500, 503)
            assert r.json()["error"]["type"] in ("server_error", "service_unavailable")
        deadline = time.monotonic() + 5
        while c.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error"


def test_nvml_figures_are_mib_summed_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    mib = 1024 * 1024
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            used=(1000 + h) * mib, total=23028 * mib
        ),
        nvmlDeviceGetName=lambda h: b"NVIDIA A10G",
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # gpu loads NVML once per process and keeps it: forget it, so this test's pynvml is used.
    monkeypatch.setattr(gpu, "_nvml", None)
    mem = gpu.gpu_memory()
    assert (mem.used_mib, mem.total_mib, mem.name, mem.count) == (2001, 46056, "NVIDIA A10G", 2)


def test_no_nvml_means_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_init() -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=broken_init))
    # As above: the process-wide NVML handle is forgotten so the broken one is loaded.
    monkeypatch.setattr(gpu, "_nvml", None)
    assert gpu.gpu_memory() == gpu.GpuMemory(0, 0, None, 0)
