"""Probes and facts: ``/``, ``/health`` (+ ``/live``, ``/ready``), ``/status``, ``/metrics``.

None of these needs the API key (the monitor polls them) and none touches the model, so they
answer while the engine is busy or still loading.
"""

from __future__ import annotations

import platform
import time

import psutil
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from remote_service import SERVICE_NAME, __version__
from remote_service.api.protocol import (
    HealthResponse,
    InfoResponse,
    LivenessResponse,
    StatusResponse,
)
from remote_service.api.serving import utc_now_iso
from remote_service.engine.base import Engine, EngineState
from remote_service.gpu import gpu_memory
from remote_service.metrics import Metrics, merge_exposition
from remote_service.settings import Settings

router = APIRouter(tags=["health"])
_GIB = 1024**3
_STATUS_WORDS = {
    EngineState.READY: "healthy",
    EngineState.LOADING: "loading",
    EngineState.ERROR: "error",
    EngineState.STOPPED: "stopped",
}


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


@router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse, "description": "loading, or the engine failed"}},
)
async def health(request: Request) -> JSONResponse:
    """Readiness: 200 ``{"status": "ok", "timestamp"}`` once the model serves, else 503."""
    state = _engine(request).health()
    if state.state is EngineState.READY:
        return JSONResponse({"status": "ok", "timestamp": utc_now_iso()})
    if state.state is EngineState.LOADING:
        return JSONResponse({"status": "loading"}, status_code=503)
    body = {"status": "error", "timestamp": utc_now_iso()}
    if state.detail:
        body["detail"] = state.detail
    return JSONResponse(body, status_code=503)


@router.get(
    "/health/ready",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse}},
)
async def ready(request: Request) -> JSONResponse:
    """Same as /health (the readiness probe)."""
    return await health(request)


@router.get("/health/live", response_model=LivenessResponse)
async def live() -> LivenessResponse:
    """Liveness: the process and its event loop answer, loaded or not."""
    return LivenessResponse(timestamp=utc_now_iso())


@router.get(
    "/status",
    response_model=StatusResponse,
    responses={503: {"model": StatusResponse, "description": "loading or failed"}},
)
async def status(request: Request) -> JSONResponse:
    """The monitor's format; 503 with the same body while loading or after a failure."""
    settings: Settings = request.app.state.settings
    engine = _engine(request)
    health = engine.health()
    info, stats = engine.info, await engine.current_stats()
    gpu = gpu_memory()
    vm = psutil.virtual_memory()
    body = StatusResponse(
        status=_STATUS_WORDS[health.state],  # type: ignore[arg-type]
        model=settings.served_model_name,
        gpu_memory_used=gpu.used_mib,
        gpu_memory_total=gpu.total_mib,
        ram_usage_gb=round((vm.total - vm.available) / _GIB, 2),
        port=settings.port,
        timestamp=utc_now_iso(),
        backend=info.backend,
        device=info.device,
        dtype=info.dtype,
        quantization=info.quantization,
        gpu_name=gpu.name,
        ram_total_gb=round(vm.total / _GIB, 2),
        process_rss_gb=round(psutil.Process().memory_info().rss / _GIB, 3),
        uptime_s=round(time.time() - request.app.state.started_at, 1),
        load_time_s=info.load_time_s,
        warmup_time_s=info.warmup_time_s,
        requests_running=stats.running,
        requests_waiting=stats.waiting,
        requests_finished=stats.requests_finished,
        tokens_generated=stats.tokens_generated,
        tokens_per_s=stats.tokens_per_s,
        max_num_seqs=info.max_num_seqs,
        max_model_len=info.max_model_len,
        detail=health.detail,
        engine=info.backend,
    )
    code = 200 if health.state is EngineState.READY else 503
    return JSONResponse(body.model_dump(mode="json"), status_code=code)


@router.get("/", response_model=InfoResponse)
async def info(request: Request) -> InfoResponse:
    """What is served, how, and with which versions."""
    settings: Settings = request.app.state.settings
    engine = _engine(request)
    info = engine.info
    versions = {"python": platform.python_version(), "service": __version__, **info.versions}
    for pkg in ("fastapi", "uvicorn", "pydantic"):
        versions[pkg] = _version(pkg)
    return InfoResponse(
        service=SERVICE_NAME,
        version=__version__,
        model=settings.served_model_name,
        status=engine.health().state.value,
        backend=info.backend,
        device=info.device,
        dtype=info.dtype,
        quantization=info.quantization,
        max_model_len=info.max_model_len,
        max_num_seqs=info.max_num_seqs,
        max_new_tokens=settings.max_new_tokens,
        reasoning=settings.reasoning,
        auth=settings.api_key is not None,
        versions=versions,
        endpoints=sorted(request.app.openapi()["paths"]),
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the ``asoba:*`` metrics, then the vLLM child's ``vllm:*`` ones
    when it runs (without its process/python families, which would repeat ours)."""
    m: Metrics = request.app.state.metrics
    ours = m.render()
    theirs = await _engine(request).extra_metrics()
    return Response(merge_exposition(ours, theirs), media_type=m.content_type)


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"
