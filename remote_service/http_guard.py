"""The front door's ASGI layers: a request-body cap and request ids.

``BodyLimitMiddleware`` answers 413 before the application reads a byte when
``Content-Length`` is over ``ASOBA_MAX_REQUEST_BYTES``, and counts the bytes of a body without
one (chunked) as they arrive, answering 413 at the first byte over the cap. So no client,
authenticated or not, can make the server hold more than the cap per request: the body is read
before FastAPI runs the API-key dependency, and it is read whole.

``RequestIdMiddleware`` puts ``x-request-id`` on every response: the client's own id when it
sent a sane one (printable ASCII, at most 128 characters), else a new one. The access log
reads it from the scope. It also writes ``x-ignored-fields``: the request fields the serving
logic ignored (unknown to this server), when there were any.
"""

from __future__ import annotations

import json
import re
import uuid
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_KEY = "asoba.request_id"
IGNORED_KEY = "asoba.ignored_fields"  # set by the serving logic: names for x-ignored-fields
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value)
    return None


def _error(status: int, message: str, code: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # The rest of the body is never read: the connection cannot be reused.
        (b"connection", b"close"),
    ]
    return headers, body


def ignored_header(names: list[str]) -> bytes:
    """Field names as a header value: percent-encoded (a client chose them: any character,
    even none at all), comma-separated."""
    return ", ".join(quote(name, safe="._-[]") or '""' for name in names).encode("ascii")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                await self._refuse(send, 400, "Content-Length is not a number", "bad_request")
                return
            if length > self.max_bytes:
                await self._refuse_too_large(send)
                return
        seen = 0
        started = False
        refused = False

        async def counted_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if not started:
                        refused = True
                        await self._refuse_too_large(send)
                    # The application sees a client that went away, and stops.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # we answered already: drop what the application says after
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise  # a disconnect we caused is no server fault; anything else is

    async def _refuse_too_large(self, send: Send) -> None:
        await self._refuse(
            send,
            413,
            f"the request body exceeds this server's limit of {self.max_bytes} bytes",
            "request_too_large",
        )

    @staticmethod
    async def _refuse(send: Send, status: int, message: str, code: str) -> None:
        headers, body = _error(status, message, code)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        text = given.decode("latin-1") if given else ""
        rid = text if _REQUEST_ID_RE.match(text) else uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                ignored = scope.get(IGNORED_KEY)
                if ignored:
                    headers.append((b"x-ignored-fields", ignored_header(ignored)))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)
