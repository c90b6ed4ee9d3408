"""The FastAPI application: built once from settings, with an engine and a lifespan.

On startup the lifespan starts loading the model on a background thread, so ``/health`` answers
503 ``loading`` (and ``/status`` ``loading``) until the model is loaded and warmed up (with
``ASOBA_BACKEND=vllm``: until the vLLM child server answers its ``/health``). On
shutdown (after uvicorn has drained or cancelled open requests) it stops the engine, giving
running sequences up to ``ASOBA_SHUTDOWN_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from remote_service import SERVICE_NAME, __version__
from remote_service.access_log import AccessLogMiddleware
from remote_service.api import routes_generate, routes_health, routes_openai, routes_vllm
from remote_service.api.errors import install_error_handlers
from remote_service.api.serving import Serving
from remote_service.engine import Engine, EngineLoadError, build_engine
from remote_service.engine.base import EngineState
from remote_service.http_guard import BodyLimitMiddleware, RequestIdMiddleware
from remote_service.metrics import Metrics
from remote_service.settings import Settings

log = logging.getLogger(__name__)
_ENGINE_GRACE_S = 2.0


def _load_in_background(engine: Engine, metrics: Metrics) -> threading.Thread:
    def load() -> None:
        started = time.perf_counter()
        try:
            engine.load()
        except EngineLoadError as exc:
            log.error("model load failed: %s", exc)
            return
        except Exception:
            log.exception("model load failed")
            return
        metrics.model_load.set(engine.info.load_time_s or time.perf_counter() - started)
        metrics.ready.set(1)

    thread = threading.Thread(target=load, name="model-load", daemon=True)
    thread.start()
    return thread


def _openapi_as_served(app: FastAPI, settings: Settings, engine: Engine) -> None:
    """The OpenAPI document with this server's own limits, so a request the document calls
    valid is one the server accepts: ``max_tokens`` up to ASOBA_MAX_NEW_TOKENS, prompts up to
    ASOBA_MAX_PROMPT_CHARS, token ids inside the vocabulary (once the model is loaded). Without
    ASOBA_API_KEY nothing asks for credentials, and the document says so."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = copy.deepcopy(build())
        if settings.api_key is None:
            schema.get("components", {}).pop("securitySchemes", None)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    if isinstance(operation, dict):
                        operation.pop("security", None)
                        operation.get("responses", {}).pop("401", None)
        vocab = engine.info.vocab_size if engine.health().state is EngineState.READY else None
        for model in schema.get("components", {}).get("schemas", {}).values():
            for name, prop in model.get("properties", {}).items():
                if name in ("max_tokens", "max_completion_tokens"):
                    _bound(prop, "integer", "maximum", settings.max_new_tokens)
                elif name == "prompt":
                    _bound(prop, "string", "maxLength", settings.max_prompt_chars)
                    if vocab:
                        _bound(prop, "integer", "maximum", vocab - 1)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _bound(node: Any, type_: str, key: str, limit: int) -> None:
    """Set ``key`` to at most ``limit`` on every ``type_`` schema inside ``node``."""
    if isinstance(node, list):
        for item in node:
            _bound(item, type_, key, limit)
    elif isinstance(node, dict):
        if node.get("type") == type_:
            node[key] = min(limit, node.get(key, limit))
        for value in node.values():
            _bound(value, type_, key, limit)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. ``engine`` defaults to the one ``settings.backend`` names."""
    metrics = Metrics(settings.served_model_name)
    if engine is None:
        engine = build_engine(settings, observer=metrics)
    metrics.track_engine(engine.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loader = _load_in_background(engine, metrics)
        try:
            yield
        finally:
            # uvicorn has already waited up to ASOBA_SHUTDOWN_TIMEOUT for open requests and
            # cancelled the rest, so only a short grace is left for the engine itself.
            grace = min(_ENGINE_GRACE_S, settings.shutdown_timeout)
            log.info("stopping the engine")
            await asyncio.to_thread(engine.shutdown, grace)
            await engine.aclose()
            metrics.ready.set(0)

    app = FastAPI(
        title=SERVICE_NAME,
        version=__version__,
        description="LLM inference: /generate, OpenAI-compatible /v1, /health, /status, /metrics",
        lifespan=lifespan,
        # The API's own description is for developers: served only when asked for.
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
        openapi_url="/openapi.json" if settings.api_docs else None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = Serving(engine, settings)
    app.state.started_at = time.time()
    install_error_handlers(app)
    _openapi_as_served(app, settings, engine)
    app.include_router(routes_health.router)
    app.include_router(routes_generate.router)
    # vLLM serves the whole OpenAI API itself: /v1 is forwarded to it as it is.
    app.include_router(routes_vllm.router if settings.backend == "vllm" else routes_openai.router)
    # Added innermost first: the access log sees every answer, 413s and CORS preflights too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"],
            expose_headers=["x-request-id", "x-ignored-fields", "retry-after"],
        )
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    return app
