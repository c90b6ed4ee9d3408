"""Shared route dependencies: the per-app objects and the API key guard.

All ``async def``: none of them blocks, and FastAPI runs a plain ``def`` dependency in its
thread pool, a hand-off per dependency per request that, under a flood of requests, holds the
GIL the generation thread needs (it showed as ~8% of GIL time in scripts/bench_load.py with
64 clients overflowing the queue).
"""

from __future__ import annotations

import secrets

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from remote_service.api.errors import APIError
from remote_service.api.serving import Serving
from remote_service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="ASOBA_API_KEY, as OpenAI clients send it")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="ASOBA_API_KEY")


async def get_serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def require_api_key(
    settings: Settings = Depends(get_settings),  # noqa: B008 - FastAPI's idiom
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),  # noqa: B008
    header_key: str | None = Security(_header),
) -> None:
    """When ASOBA_API_KEY is set, require it as a Bearer token or an X-API-Key header."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    given = bearer.credentials if bearer is not None else header_key
    if given is None or not secrets.compare_digest(given.encode(), expected):
        raise APIError(
            401,
            "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
