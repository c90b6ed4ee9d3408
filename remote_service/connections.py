"""The HTTP protocol the server runs: uvicorn's h11 protocol with read deadlines and a cap.

uvicorn closes a connection that idles between requests (``timeout_keep_alive``) but not one
that trickles a request's headers or body a byte at a time, so a few hundred slow clients hold
file descriptors for ever. Here:

- **Read deadline.** From the moment a connection opens, or the first byte of its next
  request, the client has ``ASOBA_REQUEST_TIMEOUT`` seconds to send the whole request (headers
  and body). Past it, a connection still in its headers gets ``408`` and is closed; one whose
  body is still arriving is closed, and the application sees the client leave.
- **Connection cap.** Beyond ``ASOBA_MAX_CONNECTIONS`` open connections, a new one is answered
  ``503`` with ``Retry-After`` at once and closed, so the process never runs out of file
  descriptors (the unit's ``LimitNOFILE`` is far above the cap).

Generation time does not count against the deadline: it stops once the request is read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def _body(message: str, type_: str, code: str) -> bytes:
    return b'{"error": {"message": "%s", "type": "%s", "param": null, "code": "%s"}}' % (
        message.encode(),
        type_.encode(),
        code.encode(),
    )


_TIMEOUT_BODY = _body("the request was not received in time", "invalid_request_error", "timeout")
_BUSY_BODY = _body("too many open connections; retry shortly", "server_error", "overloaded")


def protocol_class(*, request_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass bound to these limits (uvicorn takes a class)."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on this connection
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the request is in (or the connection is over)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle: Any = self.cycle
            if self.conn.their_state is h11.IDLE and (cycle is None or cycle.response_complete):
                if self.conn.our_state is h11.IDLE:
                    self.transport.write(_REQUEST_TIMEOUT % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
            elif cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

    return GuardedH11Protocol
