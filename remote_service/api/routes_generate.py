"""``POST /generate``: the plain prompt-in, text-out format the monitor and MCP clients use."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from remote_service.api.deps import get_serving, require_api_key
from remote_service.api.protocol import ErrorResponse, GenerateRequest, GenerateResponse
from remote_service.api.serving import Serving

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 503)
}

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.post("/generate", response_model=GenerateResponse, tags=["generation"])
async def generate(
    body: GenerateRequest,
    request: Request,
    serving: Serving = Depends(get_serving),  # noqa: B008
) -> GenerateResponse:
    return await serving.generate(body, request)
