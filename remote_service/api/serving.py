"""Serving logic behind the generation routes: validate, tokenize, run, shape the answer.

Built once per app (``app.state.serving``); the routes only call its methods. Tokenization and
chat templating run in worker threads, generation on the engine's own thread, so the event loop
only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
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
    _Request,
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
from remote_service.http_guard import IGNORED_KEY
from remote_service.log_filters import printable
from remote_service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_IGNORED_LOGGED = 1000  # names remembered as logged (a client chooses them: bounded)
_ignored_logged: set[str] = set()
_ignored_lock = threading.Lock()
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

    def note_ignored(self, body: _Request, request: Request) -> None:
        """Name the fields this request sent that the server ignores: in the answer's
        ``x-ignored-fields`` header, and once per name in the log."""
        names = [n[:64] for n in body.ignored_fields()]
        if not names:
            return
        request.scope[IGNORED_KEY] = names
        with _ignored_lock:
            new = [n for n in names if n not in _ignored_logged]
            if len(_ignored_logged) < _MAX_IGNORED_LOGGED:
                _ignored_logged.update(new)
        for name in new:
            log.warning("ignoring unknown request field %s (logged once)", printable(repr(name)))

    def check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.engine.info.vocab_size
        if vocab is not None:
            bad = next((i for i in ids if i >= vocab), None)
            if bad is not None:
                raise APIError(
                    400, f"token id {bad} is outside the vocabulary (size {vocab})", param="prompt"
                )
        return list(ids)

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
        (result,) = await self.run_all(request, [req])
        return result

    async def run_all(
        self, request: Request, reqs: list[GenerationRequest]
    ) -> list[GenerationResult]:
        """Generate several requests side by side in the batch; the first failure (or the
        client leaving) cancels the rest."""
        started = time.perf_counter()
        try:
            results = await until_disconnect(
                request, _all_or_none([self.engine.generate(r) for r in reqs])
            )
        except EngineError as exc:
            raise from_engine_error(exc) from exc
        log_details(request).update(
            id=reqs[0].request_id,
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            finish=",".join(dict.fromkeys(r.finish_reason for r in results)),
            gen_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return results

    async def open_stream(self, req: GenerationRequest) -> DeltaIterator:
        (stream,) = await self.open_streams([req])
        return stream

    async def open_streams(self, reqs: list[GenerationRequest]) -> list[DeltaIterator]:
        opened: list[DeltaIterator] = []
        try:
            for req in reqs:
                opened.append(await self.engine.stream(req))
        except EngineError as exc:
            for stream in opened:
                stream.close()
            raise from_engine_error(exc) from exc
        return opened

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
        self.note_ignored(body, request)
        prompts = _prompts(body.prompt)
        self.check_ready()
        rid = new_id("cmpl")
        reqs = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = await self.encode(prompt, add_special_tokens=True)
            else:
                ids = self.check_ids(prompt)
            params = self._params_from(body, len(ids), body.max_tokens)
            reqs.append(GenerationRequest(rid if i == 0 else f"{rid}-{i}", ids, params))
        created = int(time.time())
        if body.stream:
            usage = _UsageOptions.of(body)
            streams = await self.open_streams(reqs)
            return _sse(self._completion_events(rid, streams, created, usage, request), request)
        results = await self.run_all(request, reqs)
        return CompletionResponse(
            id=rid,
            created=created,
            model=self.model_name,
            choices=[
                CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
                for i, r in enumerate(results)
            ],
            usage=_usage(
                sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
            ),
        )

    async def _completion_events(
        self,
        rid: str,
        streams: list[DeltaIterator],
        created: int,
        usage: _UsageOptions,
        request: Request,
    ) -> AsyncIterator[bytes]:
        base = {"id": rid, "object": "text_completion", "created": created}
        base["model"] = self.model_name
        counts: dict[int, tuple[int, int]] = {}
        async for index, delta in _tracked(streams, request, rid):
            if delta.error:
                yield sse.event(error_body(delta.error, "server_error"))
                break
            counts[index] = (delta.prompt_tokens, delta.completion_tokens)
            if delta.text or delta.finish_reason:
                choice = {
                    "index": index,
                    "text": delta.text,
                    "logprobs": None,
                    "finish_reason": delta.finish_reason,
                }
                event: dict[str, Any] = {**base, "choices": [choice]}
                if usage.continuous:
                    event["usage"] = _usage(*counts[index]).model_dump()
                yield sse.event(event)
        else:
            if usage.final:
                total = _usage(
                    sum(p for p, _ in counts.values()), sum(c for _, c in counts.values())
                )
                yield sse.event({**base, "choices": [], "usage": total.model_dump()})
        yield sse.DONE

    # --- /v1/chat/completions ------------------------------------------------------------

    async def chat(
        self, body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | StreamingResponse:
        self.check_model(body.model)
        self.note_ignored(body, request)
        _reject_chat(body)
        messages = _template_messages(body)
        self.check_ready()
        try:
            prompt = await asyncio.to_thread(
                self.engine.render_chat, messages, body.chat_template_kwargs or {}
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
            deltas = await self.open_stream(req)
            splitter = ThinkSplitter.for_prompt(prompt) if split else None
            usage = _UsageOptions.of(body)
            events = self._chat_events(req, deltas, created, usage, splitter, request)
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
        usage: _UsageOptions,
        splitter: ThinkSplitter | None,
        request: Request,
    ) -> AsyncIterator[bytes]:
        base: dict[str, Any] = {
            "id": req.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.model_name,
        }

        counts = (0, 0)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            event: dict[str, Any] = {**base, "choices": [choice]}
            if usage.continuous:
                event["usage"] = _usage(*counts).model_dump()
            return sse.event(event)

        yield chunk({"role": "assistant", "content": ""})
        async for _, delta in _tracked([deltas], request, req.request_id):
            counts = (delta.prompt_tokens, delta.completion_tokens)
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
                if usage.final:
                    total = _usage(delta.prompt_tokens, delta.completion_tokens).model_dump()
                    yield sse.event({**base, "choices": [], "usage": total})
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


@dataclass(frozen=True)
class _UsageOptions:
    final: bool  # stream_options.include_usage: one usage chunk at the end
    continuous: bool  # stream_options.continuous_usage_stats (vLLM's): usage in every chunk

    @classmethod
    def of(cls, body: CompletionRequest | ChatCompletionRequest) -> _UsageOptions:
        options = body.stream_options
        if options is None:
            return cls(False, False)
        return cls(options.include_usage, options.continuous_usage_stats)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One prompt per choice: a string, a list of strings, token ids, or lists of them."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


async def _all_or_none(work: list[Awaitable[T]]) -> list[T]:
    """Await all of ``work`` side by side; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _reject_chat(body: ChatCompletionRequest) -> None:
    reserved = sorted(set(body.chat_template_kwargs or {}) & _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs may not set {', '.join(reserved)}",
            param="chat_template_kwargs",
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
        # the call's own parameters: a template variable by these names cannot be passed
        "messages",
        "self",
    }
)


def _template_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as chat templates expect them: role and one content string."""
    out = []
    for msg in body.messages:
        content = msg.content
        if isinstance(content, list):  # text parts only (the schema admits no others)
            content = "".join(part.text for part in content)
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


async def _merged(streams: list[DeltaIterator]) -> AsyncIterator[tuple[int, Delta]]:
    """The deltas of several streams as they come, each with its stream's index."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

    async def pump(index: int, stream: DeltaIterator) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    live = len(tasks)
    try:
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _tracked(
    streams: list[DeltaIterator], request: Request, rid: str
) -> AsyncIterator[tuple[int, Delta]]:
    """Iterate the streams' deltas, noting timings for the access log; always release the
    slots."""
    details = log_details(request)
    started = time.perf_counter()
    details["id"] = rid
    counts: dict[int, tuple[int, int]] = {}
    finished: dict[int, str] = {}
    try:
        async for index, delta in _merged(streams):
            if "ttft_ms" not in details and (delta.text or delta.completion_tokens):
                details["ttft_ms"] = round((time.perf_counter() - started) * 1000, 1)
            counts[index] = (delta.prompt_tokens, delta.completion_tokens)
            details.update(
                prompt_tokens=sum(p for p, _ in counts.values()),
                completion_tokens=sum(c for _, c in counts.values()),
            )
            if delta.finish_reason:
                finished[index] = delta.finish_reason
                details["finish"] = ",".join(dict.fromkeys(finished.values()))
            yield index, delta
    finally:
        for stream in streams:
            stream.close()


def _sse(events: AsyncIterator[bytes], request: Request) -> StreamingResponse:
    log_details(request)["stream"] = True
    return StreamingResponse(events, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
