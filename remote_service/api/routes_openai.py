"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from remote_service.api.deps import get_serving, require_api_key
from remote_service.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from remote_service.api.routes_generate import ERRORS
from remote_service.api.serving import Serving

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)

_STREAM_DOC: dict[int | str, dict[str, object]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}
}


@router.get("/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request, serving: Serving = Depends(get_serving)) -> ModelList:  # noqa: B008
    return ModelList(data=[_card(request, serving)])


def _card(request: Request, serving: Serving) -> ModelCard:
    return ModelCard(
        id=serving.model_name,
        created=int(request.app.state.started_at),
        max_model_len=serving.engine.info.max_model_len,
    )


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    tags=["openai"],
    responses={404: {"model": ErrorResponse, "description": "No such model"}},
)
async def get_model(
    model_id: str,
    request: Request,
    serving: Serving = Depends(get_serving),  # noqa: B008
) -> ModelCard:
    serving.check_model(model_id)
    return _card(request, serving)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=_STREAM_DOC,
    tags=["openai"],
)
async def completions(
    body: CompletionRequest,
    request: Request,
    serving: Serving = Depends(get_serving),  # noqa: B008
) -> CompletionResponse | StreamingResponse:
    return await serving.completions(body, request)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    response_model_exclude_none=False,
    responses=_STREAM_DOC,
    tags=["openai"],
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    serving: Serving = Depends(get_serving),  # noqa: B008
) -> ChatCompletionResponse | StreamingResponse:
    return await serving.chat(body, request)
