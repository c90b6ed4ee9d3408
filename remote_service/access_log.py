"""One log line per request, written when its last byte is sent (streams included).

    POST /v1/chat/completions 200 812.4ms id=chatcmpl-… prompt_tokens=25 completion_tokens=64
    ttft_ms=41.2 finish=length stream=True

A pure ASGI middleware (no response buffering); it also feeds the HTTP metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from remote_service.api.serving import LOG_KEY
from remote_service.http_guard import REQUEST_ID_KEY
from remote_service.log_filters import printable
from remote_service.metrics import Metrics

log = logging.getLogger("remote_service.access")

# Probes are polled every few seconds: log them only at debug level.
_QUIET = frozenset({"/health", "/health/live", "/health/ready", "/metrics", "/status"})


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        logged = False

        def finish() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            seconds = time.perf_counter() - started
            path = scope.get("path", "")
            route = _route_of(scope)
            if self.metrics is not None:
                self.metrics.http_request(scope.get("method", ""), route, status, seconds)
            details: dict[str, Any] = dict(scope.get(LOG_KEY) or {})
            if REQUEST_ID_KEY in scope:
                details.setdefault("rid", scope[REQUEST_ID_KEY])
            extra = "".join(f" {k}={printable(str(v), 200)}" for k, v in details.items())
            level = logging.DEBUG if path in _QUIET and status < 400 else logging.INFO
            client = scope.get("client")
            peer = f"{client[0]}" if client else "-"
            log.log(
                level,
                "%s %s %s %d %.1fms%s",
                peer,
                printable(scope.get("method", ""), 32),
                printable(path),  # a client's %0A must not start a second line
                status,
                seconds * 1000,
                extra,
            )

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status = 499  # the client left, or shutdown cancelled the request
            raise
        except Exception:
            status = 500
            raise
        finally:
            finish()


def _route_of(scope: Scope) -> str:
    """The matched route's template (bounded label values), not the raw path."""
    return str(getattr(scope.get("route"), "path", None) or "other")
