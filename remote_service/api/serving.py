"""Serving logic behind the generation routes: validate, tokenize, run, shape the answer.

Built once per app (``app.state.serving``); the routes only call its methods. Tokenization and
chat templating run in worker threads, generation on the engine's own thread, so the event loop
only moves bytes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from remote_service.api import sse
from remote_service.api.errors import (
    APIError,
    ClientDisconnectedError,
    error_body,
    from_engine_error,
)
from remote_service.api.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GenerateChoice,
    GenerateRequest,
    GenerateResponse,
    Usage,
)
from remote_service.api.reasoning import ThinkSplitter, split_reasoning
from remote_service.engine.base import (
    Delta,
    DeltaIterator,
    Engine,
    EngineError,
    EngineNotReadyError,
    EngineState,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from remote_service.settings import Settings

T = TypeVar("T")
MAX_STOP_SEQUENCES = 4
LOG_KEY = "asoba.log"  # scope key the access log reads per-request details from
_DISCONNECT_POLL_S = 0.25


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def log_details(request: Request) -> dict[str, Any]:
    details: dict[str, Any] = request.scope.setdefault(LOG_KEY, {})
    return details


class Serving:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    # --- checks --------------------------------------------------------------------------

    def check_ready(self) -> None:
        health = self.engine.health()
        if health.state is not EngineState.READY:
            raise EngineNotReadyError(
                f"the model is not ready ({health.state.value})"
                + (f": {health.detail}" if health.detail else "")
            )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    async def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        if not text:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(text) > self.settings.max_prompt_chars:
            raise APIError(
                400,
                f"prompt is {len(text)} characters; the limit is {self.settings.max_prompt_chars}",
                param="prompt",
            )
        ids = await asyncio.to_thread(
            self.engine.encode, text, add_special_tokens=add_special_tokens
        )
        if not ids:
            raise APIError(400, "prompt has no tokens", param="prompt")
        return ids

    def sampling(
        self,
        prompt_len: int,
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        prompt_param: str = "prompt",
    ) -> SamplingParams:
        cap = self.settings.max_new_tokens
        if max_tokens is not None and max_tokens > cap:
            raise APIError(
                400,
                f"max_tokens={max_tokens} exceeds this server's cap of {cap}",
                param="max_tokens",
            )
        limit = self.engine.info.max_model_len
        room = limit - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; "
                f"the prompt is {prompt_len} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt is "
                f"{prompt_len} tokens and max_tokens is {max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
        d = self.engine.defaults
        return SamplingParams(
            max_tokens=max_tokens
            if max_tokens is not None
            else min(self.settings.default_max_tokens, room),
            temperature=d.temperature if temperature is None else temperature,
            top_p=d.top_p if top_p is None else top_p,
            top_k=d.top_k if top_k is None else max(0, top_k),
            repetition_penalty=d.repetition_penalty
            if repetition_penalty is None
            else repetition_penalty,
            stop=tuple(s for s in stops if s),
            seed=seed,
            ignore_eos=ignore_eos,
        )

    # --- running -------------------------------------------------------------------------

    async def run(self, request: Request, req: GenerationRequest) -> GenerationResult:
        """Generate without streaming; a client that disconnects cancels the work."""
        started = time.perf_counter()
        try:
            result = await until_disconnect(request, self.engine.generate(req))
        except EngineError as exc:
            raise from_engine_error(exc) from exc
        log_details(request).update(
            id=req.request_id,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish=result.finish_reason,
            gen_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return result

    async def open_stream(self, req: GenerationRequest) -> DeltaIterator:
        try:
            return await self.engine.stream(req)
        except EngineError as exc:
            raise from_engine_error(exc) from exc

    # --- /generate -----------------------------------------------------------------------

    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        self.check_ready()
        ids = await self.encode(body.prompt, add_special_tokens=True)
        params = self.sampling(
            len(ids),
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            seed=body.seed,
        )
        now = datetime.now(UTC)
        rid = f"gen-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
        result = await self.run(request, GenerationRequest(rid, ids, params))
        return GenerateResponse(
            choices=[GenerateChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            model=self.model_name,
            created=int(now.timestamp()),
            id=rid,
        )

    # --- /v1/completions -----------------------------------------------------------------

    async def completions(
        self, body: CompletionRequest, request: Request
    ) -> CompletionResponse | StreamingResponse:
        self.check_model(body.model)
        _reject_common(body)
        for name, value, default in (
            ("echo", body.echo, False),
            ("logprobs", body.logprobs, None),
            ("suffix", body.suffix, None),
        ):
            if value != default:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send exactly one prompt per request", param="prompt")
            prompt = prompt[0]
        self.check_ready()
        ids = await self.encode(prompt, add_special_tokens=True)
        params = self._params_from(body, len(ids), body.max_tokens)
        req = GenerationRequest(new_id("cmpl"), ids, params)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            deltas = await self.open_stream(req)
            return _sse(
                self._completion_events(req, deltas, created, include_usage, request), request
            )
        result = await self.run(request, req)
        return CompletionResponse(
            id=req.request_id,
            created=created,
            model=self.model_name,
            choices=[
                CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)
            ],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
        )

    async def _completion_events(
        self,
        req: GenerationRequest,
        deltas: DeltaIterator,
        created: int,
        include_usage: bool,
        request: Request,
    ) -> AsyncIterator[bytes]:
        base = {"id": req.request_id, "object": "text_completion", "created": created}
        base["model"] = self.model_name
        async for delta in _tracked(deltas, request, req.request_id):
            if delta.error:
                yield sse.event(error_body(delta.error, "server_error"))
                break
            if delta.text or delta.finish_reason:
                choice = {
                    "index": 0,
                    "text": delta.text,
                    "logprobs": None,
                    "finish_reason": delta.finish_reason,
                }
                yield sse.event({**base, "choices": [choice]})
            if delta.finish_reason and include_usage:
                usage = _usage(delta.prompt_tokens, delta.completion_tokens).model_dump()
                yield sse.event({**base, "choices": [], "usage": usage})
        yield sse.DONE

    # --- /v1/chat/completions ------------------------------------------------------------

    async def chat(
        self, body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | StreamingResponse:
        self.check_model(body.model)
        _reject_common(body)
        _reject_chat(body)
        messages = _template_messages(body)
        self.check_ready()
        try:
            prompt = await asyncio.to_thread(
                self.engine.render_chat, messages, **(body.chat_template_kwargs or {})
            )
        except ValueError as exc:  # the template refused the conversation
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        ids = await self.encode(prompt, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self._params_from(body, len(ids), max_tokens)
        req = GenerationRequest(new_id("chatcmpl"), ids, params)
        created = int(time.time())
        split = self.settings.reasoning == "split"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            deltas = await self.open_stream(req)
            splitter = ThinkSplitter.for_prompt(prompt) if split else None
            events = self._chat_events(req, deltas, created, include_usage, splitter, request)
            return _sse(events, request)
        result = await self.run(request, req)
        reasoning, content = None, result.text
        if split:
            reasoning, content = split_reasoning(
                result.text, in_reasoning=ThinkSplitter.for_prompt(prompt).had_reasoning
            )
        return ChatCompletionResponse(
            id=req.request_id,
            created=created,
            model=self.model_name,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatResponseMessage(content=content, reasoning_content=reasoning),
                    finish_reason=result.finish_reason,
                )
            ],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
        )

    async def _chat_events(
        self,
        req: GenerationRequest,
        deltas: DeltaIterator,
        created: int,
        include_usage: bool,
        splitter: ThinkSplitter | None,
        request: Request,
    ) -> AsyncIterator[bytes]:
        base: dict[str, Any] = {
            "id": req.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.model_name,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse.event({**base, "choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        async for delta in _tracked(deltas, request, req.request_id):
            if delta.error:
                yield sse.event(error_body(delta.error, "server_error"))
                break
            text = delta.text
            if splitter is not None:
                reasoning, text = splitter.feed(text)
                if delta.finish_reason:
                    r2, c2 = splitter.flush()
                    reasoning, text = reasoning + r2, text + c2
                if reasoning:
                    yield chunk({"reasoning_content": reasoning})
            if text:
                yield chunk({"content": text})
            if delta.finish_reason:
                yield chunk({}, delta.finish_reason)
                if include_usage:
                    usage = _usage(delta.prompt_tokens, delta.completion_tokens).model_dump()
                    yield sse.event({**base, "choices": [], "usage": usage})
        yield sse.DONE

    def _params_from(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        prompt_len: int,
        max_tokens: int | None,
    ) -> SamplingParams:
        prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        return self.sampling(
            prompt_len,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            prompt_param=prompt_param,
        )


# --- helpers ---------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _reject_common(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0.0):
            raise APIError(400, f"{name} is not supported; use repetition_penalty", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _reject_chat(body: ChatCompletionRequest) -> None:
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice is not supported", param="tool_choice")
    reserved = sorted(set(body.chat_template_kwargs or {}) & _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs may not set {', '.join(reserved)}",
            param="chat_template_kwargs",
        )
    if body.response_format and body.response_format.get("type") != "text":
        raise APIError(
            400, "only response_format type 'text' is supported", param="response_format"
        )


# Arguments of apply_chat_template itself, not variables of the template: not for clients.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "chat_template",
        "conversation",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "tools",
        "documents",
    }
)


def _template_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as chat templates expect them: role and one content string."""
    out = []
    for i, msg in enumerate(body.messages):
        if msg.tool_calls:
            raise APIError(400, "tool calls are not supported", param=f"messages.{i}.tool_calls")
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"content part type '{part.type}' is not supported; only text parts",
                        param=f"messages.{i}.content.{j}",
                    )
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": content or ""})
    return out


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (freeing its batch slot) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnectedError
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _tracked(deltas: DeltaIterator, request: Request, rid: str) -> AsyncIterator[Delta]:
    """Iterate ``deltas``, noting timings for the access log; always release the slot."""
    details = log_details(request)
    started = time.perf_counter()
    details["id"] = rid
    try:
        async for delta in deltas:
            if "ttft_ms" not in details and (delta.text or delta.completion_tokens):
                details["ttft_ms"] = round((time.perf_counter() - started) * 1000, 1)
            details.update(
                prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens
            )
            if delta.finish_reason:
                details["finish"] = delta.finish_reason
            yield delta
    finally:
        deltas.close()


def _sse(events: AsyncIterator[bytes], request: Request) -> StreamingResponse:
    log_details(request)["stream"] = True
    return StreamingResponse(events, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
