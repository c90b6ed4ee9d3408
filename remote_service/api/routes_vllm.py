"""``/v1/*`` with ``ASOBA_BACKEND=vllm``: forwarded to the vLLM child over its unix socket.

The front keeps what it does for every route (API key, body cap, connection cap, request id,
access log, CORS); vLLM answers the request itself, every OpenAI route it serves. The request
body is read whole first (at most ``ASOBA_MAX_REQUEST_BYTES``: the body cap answers 413 before
the child sees a byte), then sent with its method, path, query, ``content-type`` and
``accept``. The answer comes back as it arrives: status, headers less the hop-by-hop ones,
each body chunk sent on at once (SSE streams included). A client that leaves, while vLLM is
still working on a non-streaming answer or in the middle of a stream, closes the upstream
connection, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from remote_service.api.deps import require_api_key
from remote_service.api.errors import APIError, ClientDisconnectedError
from remote_service.api.serving import LOG_KEY, log_details, until_disconnect
from remote_service.engine.vllm_engine import VllmEngine
from remote_service.http_guard import REQUEST_ID_KEY

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

_FORWARDED = ("content-type", "accept")
# Hop-by-hop (RFC 9110 7.6.1) and what our own server sets for the answer it sends.
_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "date",
        "server",
        "x-request-id",
    }
)


def _engine(request: Request) -> VllmEngine:
    engine = request.app.state.engine
    assert isinstance(engine, VllmEngine)
    return engine


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
async def proxy(path: str, request: Request) -> Response:
    engine = _engine(request)
    engine.check_ready()  # 503 loading/error with Retry-After, before reading the body
    body = await request.body()
    headers = {name: value for name in _FORWARDED if (value := request.headers.get(name))}
    headers["accept-encoding"] = "identity"  # bytes pass through as vLLM wrote them
    rid = request.scope.get(REQUEST_ID_KEY)
    if rid:
        headers["x-request-id"] = rid
    client = engine.client()
    upstream = client.build_request(
        request.method,
        httpx.URL(path="/v1/" + path, query=request.url.query.encode("latin-1")),
        content=body,
        headers=headers,
    )
    log_details(request)["upstream"] = "vllm"
    engine.begin()
    try:
        response = await until_disconnect(request, client.send(upstream, stream=True))
    except httpx.HTTPError as exc:
        engine.end()
        raise APIError(
            503,
            f"the engine did not answer: {type(exc).__name__}",
            type="service_unavailable",
            headers={"Retry-After": "5"},
        ) from exc
    except BaseException:
        engine.end()
        raise
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        log_details(request)["stream"] = True
    return _Relay(response, engine)


class _Relay(Response):
    """The child's answer, relayed chunk by chunk; the upstream is closed however it ends
    (done, the client left, shutdown cancelled it)."""

    def __init__(self, upstream: httpx.Response, engine: VllmEngine) -> None:
        self.upstream = upstream
        self.engine = engine
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = [
            (k.lower(), v)
            for k, v in upstream.headers.raw
            if k.decode("latin-1").lower() not in _DROPPED
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self._relay(send))
        watch = asyncio.ensure_future(_until_disconnect(receive))
        try:
            done, _ = await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
            if relay in done:
                relay.result()
            else:
                raise ClientDisconnectedError
        except ClientDisconnectedError:
            log_details_of(scope)["client_left"] = True
        finally:
            for task in (relay, watch):
                task.cancel()
            await asyncio.gather(relay, watch, return_exceptions=True)
            await self.upstream.aclose()
            self.engine.end()

    async def _relay(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            # The child went away mid-answer: end ours (the client sees a cut body).
            log.warning("the vLLM answer broke off: %s", exc)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def log_details_of(scope: Scope) -> dict[str, object]:
    details: dict[str, object] = scope.setdefault(LOG_KEY, {})
    return details
