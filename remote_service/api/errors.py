"""OpenAI-shaped error answers for everything that can go wrong in a request.

Bad input is a 4xx (never a 500): validation and malformed JSON are 400, a wrong API key 401,
an unknown model or route 404, a full queue 429 and a model that is not ready 503, both with
``Retry-After``. Only a genuine server fault is a 500, and its body says no more than that.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from remote_service.engine.base import EngineError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answer decided by the serving logic."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


class ClientDisconnectedError(Exception):
    """The client went away before a non-streaming answer was ready (logged as 499)."""


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


def from_engine_error(exc: EngineError) -> APIError:
    headers = None
    if exc.retry_after_s is not None:  # a full queue (429), a model not ready (503)
        headers = {"Retry-After": str(exc.retry_after_s)}
    message = str(exc) if exc.status < 500 or exc.status == 503 else "the model failed"
    code = "rate_limit_exceeded" if exc.status == 429 else None
    return APIError(exc.status, message, type=exc.type, code=code, headers=headers)


_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
}


def describe_validation(exc: RequestValidationError) -> APIError:
    """Turn pydantic's error list into one OpenAI-style message naming the first bad field."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = _field_path(first.get("loc", ()))
    kind = str(first.get("type", ""))
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('msg', '')}", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"Unrecognized request argument supplied: {loc[-1] if loc else '?'}",
            param=param,
        )
    if kind == "missing" and not loc:
        return APIError(400, "a JSON request body is required", code="missing_body")
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param=param)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "tuple"})
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _field_path(loc: Any) -> list[str]:
    """The field names and indices of a pydantic error location, without ``body`` and
    without the union-member tags pydantic adds (``str``, ``list[int]``, ``function-after``)."""
    path: list[str] = []
    for part in loc:
        text = str(part)
        if part == "body" and not path:
            continue
        if len(path) >= 2 and path[-2] == "messages" and text in _ROLES:
            continue  # the message kind pydantic picked by its role, not a field
        if not isinstance(part, int) and (
            "[" in text or "-" in text or text in _TYPE_TAGS or text.startswith("constrained")
        ):
            break
        path.append(text)
    return path


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_engine_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineError)
        if exc.status >= 500 and exc.status != 503:
            log.error("engine error: %s", exc)
        return error_response(from_engine_error(exc))

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(describe_validation(exc))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        if exc.status_code >= 500:
            type_ = "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_disconnect(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnectedError, on_disconnect)
    app.add_exception_handler(Exception, on_unexpected)
