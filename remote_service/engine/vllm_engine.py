"""The vLLM engine: the :class:`Engine` contract over a vLLM child server (see
:mod:`remote_service.engine.vllm_child` for why a child, and how it is started).

- ``load`` (on the lifespan's loader thread) starts the child and polls its ``/health`` over
  the unix socket until 200; ready then. A child that exits, or is not ready within
  ``ASOBA_VLLM_START_TIMEOUT``, puts the engine in ``error`` with the exit status and the
  child's last output lines, and :meth:`fatal` tells the server to exit non-zero (systemd
  restarts it; the journal holds the child's output).
- ``/v1/*`` is proxied as it is (``remote_service.api.routes_vllm``); ``/generate`` goes
  through the same serving logic as the transformers engine, with ``encode`` answered by the
  child's ``/tokenize`` and ``stream`` by its ``/v1/completions`` (token ids in, SSE out).
- Every request through the front counts as running until its last byte, so ``shutdown``
  waits for them (the SIGTERM drain) before it stops the child.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from remote_service.engine.base import (
    Delta,
    Engine,
    EngineError,
    EngineHealth,
    EngineInfo,
    EngineLoadError,
    EngineNotReadyError,
    EngineState,
    EngineStats,
    GenerationDefaults,
    GenerationRequest,
)
from remote_service.engine.vllm_child import (
    ChildProcess,
    VllmPlan,
    describe_exit,
    plan_vllm,
)
from remote_service.settings import Settings

log = logging.getLogger(__name__)
_RATE_WINDOW_S = 60.0  # how far back /status's tokens_per_s looks

BASE_URL = "http://vllm"  # the host part is ignored over a unix socket
_POLL_S = 0.5
_CHILD_STOP_GRACE_S = 10.0
_CONNECT_TIMEOUT_S = 5.0
_METRICS_TIMEOUT_S = 1.0


class UpstreamError(EngineError):
    """An error answer of the child, passed on with its status."""

    def __init__(self, status: int, message: str, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


class VllmEngine(Engine):
    def __init__(self, settings: Settings, plan: VllmPlan | None = None) -> None:
        self.settings = settings
        self._plan = plan
        self._state = EngineState.LOADING
        self._detail: str | None = None
        self._fatal: str | None = None
        self._child: ChildProcess | None = None
        self._ready = threading.Event()
        self._lock = threading.Condition()
        self._running = 0
        self._finished = 0
        # (monotonic time, vLLM's generated-token counter) at earlier /status calls
        self._token_samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._info = EngineInfo(
            backend="vllm",
            model_name=settings.served_model_name,
            device=settings.device,
            dtype=settings.dtype,
            quantization=settings.quantization,
            max_model_len=settings.max_model_len or 0,
            max_num_seqs=settings.max_num_seqs,
        )

    # --- the contract ----------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def defaults(self) -> GenerationDefaults:
        return GenerationDefaults()  # --generation-config vllm: vLLM's neutral defaults

    @property
    def socket_path(self) -> str:
        return str(self._plan.socket) if self._plan is not None else ""

    def health(self) -> EngineHealth:
        return EngineHealth(self._state, self._detail)

    def fatal(self) -> str | None:
        return self._fatal

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=self._running, requests_finished=self._finished)

    def load(self) -> None:
        started = time.perf_counter()
        try:
            if self._plan is None:
                self._plan = plan_vllm(self.settings)
            plan = self._plan
            log.info(
                "vLLM child: device=%s enforce_eager=%s (%s), socket %s",
                plan.device,
                "on" if plan.enforce_eager else "off",
                plan.eager_reason,
                plan.socket,
            )
            for note in plan.notes:
                log.warning("%s", note)
            self._info = replace(self._info, device=plan.device)
            self._child = ChildProcess(plan, on_exit=self._child_exited)
            with self._stop_lock:
                if self._stopped:
                    return
                self._child.start()
            self._wait_ready(started)
        except EngineLoadError as exc:
            self._fail(str(exc))
            raise
        except Exception as exc:
            self._fail(f"starting vLLM failed: {exc!r}")
            raise EngineLoadError(str(exc)) from exc

    def _wait_ready(self, started: float) -> None:
        assert self._plan is not None and self._child is not None
        deadline = time.monotonic() + self.settings.vllm_start_timeout
        transport = httpx.HTTPTransport(uds=str(self._plan.socket))
        with httpx.Client(transport=transport, base_url=BASE_URL, timeout=5.0) as client:
            while True:
                if self._state is EngineState.ERROR:
                    raise EngineLoadError(self._detail or "vLLM failed")  # the watcher saw it
                if self._state is not EngineState.LOADING:
                    return  # shut down meanwhile
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    tail = self._child.tail()
                    reason = (
                        f"vLLM was not ready within ASOBA_VLLM_START_TIMEOUT="
                        f"{self.settings.vllm_start_timeout:g}s"
                    )
                    if tail:
                        reason += "; its last output:\n" + "\n".join(tail)
                    self._fail(reason)
                    threading.Thread(
                        target=self._child.stop, args=(_CHILD_STOP_GRACE_S,), daemon=True
                    ).start()
                    raise EngineLoadError(reason)
                time.sleep(_POLL_S)
            info = self._read_info(client)
        self._info = replace(info, load_time_s=round(time.perf_counter() - started, 3))
        with self._lock:
            if self._state is EngineState.LOADING:
                self._state = EngineState.READY
        log.info(
            "model %s ready: backend=vllm device=%s max_model_len=%d load=%.2fs",
            self._info.model_name,
            self._info.device,
            self._info.max_model_len,
            time.perf_counter() - started,
        )

    def _read_info(self, client: httpx.Client) -> EngineInfo:
        info = self._info
        try:
            models = client.get("/v1/models").json()
            card = next((m for m in models.get("data", []) if m.get("id") == info.model_name), None)
            if card and isinstance(card.get("max_model_len"), int):
                info = replace(info, max_model_len=card["max_model_len"])
            version = client.get("/version").json().get("version")
            if isinstance(version, str):
                info = replace(info, versions={"vllm": version})
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.warning("could not read the model card from vLLM: %s", exc)
        return info

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._state is EngineState.STOPPED:
                return
            self._state = EngineState.ERROR
            self._detail = reason
            self._fatal = reason
            self._ready.set()
        log.error("%s", reason)

    def _child_exited(self, code: int) -> None:
        child = self._child
        if child is None or child.stopping:
            return
        self._fail(describe_exit(code, child.tail()))

    # --- requests ----------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self._state is not EngineState.READY:
            raise EngineNotReadyError(
                f"the model is not ready ({self._state.value})"
                + (f": {self._detail}" if self._detail else "")
            )

    def begin(self) -> None:
        """Count a request as running until :meth:`end` (shutdown waits for it)."""
        with self._lock:
            self._running += 1

    def end(self) -> None:
        with self._lock:
            self._running -= 1
            self._finished += 1
            self._lock.notify_all()

    @contextmanager
    def tracked(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def client(self) -> httpx.AsyncClient:
        """The async client to the child, made on first use in the serving event loop."""
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            transport = httpx.AsyncHTTPTransport(uds=self.socket_path)
            self._aclient = httpx.AsyncClient(
                transport=transport,
                base_url=BASE_URL,
                # Connect is local and quick; reads wait for generation (a client that leaves
                # closes the upstream response instead).
                timeout=httpx.Timeout(_CONNECT_TIMEOUT_S, read=None, write=30.0, pool=None),
                # The front's connection cap bounds this; no second queue here.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
            self._aclient_loop = loop
        return self._aclient

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                transport = httpx.HTTPTransport(uds=self.socket_path)
                self._client = httpx.Client(transport=transport, base_url=BASE_URL, timeout=30.0)
            return self._client

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids from the child's ``/tokenize`` (blocking: call it in a thread)."""
        self.check_ready()
        body = {
            "model": self._info.model_name,
            "prompt": text,
            "add_special_tokens": add_special_tokens,
        }
        try:
            r = self._sync_client().post("/tokenize", json=body)
        except httpx.HTTPError as exc:
            raise EngineNotReadyError(f"vLLM did not answer: {exc}") from exc
        if r.status_code != 200:
            raise _upstream_error(r.status_code, r.content)
        tokens = r.json().get("tokens")
        if not isinstance(tokens, list):
            raise UpstreamError(502, "vLLM's /tokenize answered without tokens")
        return [int(t) for t in tokens]

    def render_chat(
        self, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
    ) -> str:
        # Chat is vLLM's own /v1/chat/completions (proxied); the front never templates.
        raise NotImplementedError("the vllm backend serves chat through its own API")

    async def stream(self, request: GenerationRequest) -> _CompletionDeltas:
        self.check_ready()
        p = request.params
        body: dict[str, Any] = {
            "model": self._info.model_name,
            "prompt": list(request.prompt_ids),
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if p.top_k > 0:
            body["top_k"] = p.top_k
        if p.repetition_penalty != 1.0:
            body["repetition_penalty"] = p.repetition_penalty
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if p.ignore_eos:
            body["ignore_eos"] = True
        client = self.client()
        req = client.build_request(
            "POST", "/v1/completions", json=body, headers={"x-request-id": request.request_id}
        )
        self.begin()
        try:
            response = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            self.end()
            raise EngineNotReadyError(f"vLLM did not answer: {exc}") from exc
        except BaseException:
            self.end()
            raise
        if response.status_code != 200:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
                self.end()
            raise _upstream_error(response.status_code, content)
        return _CompletionDeltas(response, self.end)

    async def current_stats(self) -> EngineStats:
        """The front's request counts with vLLM's own queue and token figures from its
        /metrics: ``tokens_generated`` is its counter, ``tokens_per_s`` that counter's rate
        over the /status calls of the last minute (0 at the first). Only the front's figures
        when the child does not answer."""
        base = self.stats()
        figures = child_figures(await self.extra_metrics())
        if figures is None:
            return base
        waiting, tokens = figures
        now = time.monotonic()
        with self._lock:
            samples = self._token_samples
            while samples and (now - samples[0][0] > _RATE_WINDOW_S or samples[0][1] > tokens):
                samples.popleft()  # too old, or the counter went back (a new child)
            rate = 0.0
            if samples and now > samples[0][0]:
                rate = (tokens - samples[0][1]) / (now - samples[0][0])
            samples.append((now, tokens))
        return replace(
            base, waiting=int(waiting), tokens_generated=int(tokens), tokens_per_s=round(rate, 1)
        )

    async def extra_metrics(self) -> bytes:
        """The child's /metrics text (empty when it does not answer within a second)."""
        if self._child is None or self._child.returncode() is not None:
            return b""
        try:
            r = await self.client().get("/metrics", timeout=_METRICS_TIMEOUT_S)
        except httpx.HTTPError:
            return b""
        return r.content if r.status_code == 200 else b""

    def shutdown(self, timeout: float) -> None:
        """Stop admitting, wait up to ``timeout`` for requests in flight, stop the child."""
        with self._lock:
            if self._state in (EngineState.LOADING, EngineState.READY):
                self._state = EngineState.STOPPED
                self._detail = "shutting down"
            deadline = time.monotonic() + timeout
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if self._child is not None:
                self._child.stop(_CHILD_STOP_GRACE_S)
            if self._client is not None:
                self._client.close()


class _CompletionDeltas:
    """The deltas of one streamed ``/v1/completions`` answer of the child."""

    def __init__(self, response: httpx.Response, done: Callable[[], None]) -> None:
        self._response = response
        self._done = done
        self._events = self._read()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        return await self._events.__anext__()

    async def _read(self) -> AsyncGenerator[Delta, None]:
        prompt = completion = 0
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else str(error)
                    yield Delta("", completion, prompt, "error", str(message or "vLLM failed"))
                    return
                usage = event.get("usage") or {}
                prompt = int(usage.get("prompt_tokens", prompt))
                completion = int(usage.get("completion_tokens", completion))
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason")
                    yield Delta(choice.get("text") or "", completion, prompt, finish)
                    if finish:
                        return
            yield Delta("", completion, prompt, "abort", "vLLM ended the stream early")
        except httpx.HTTPError as exc:
            yield Delta("", completion, prompt, "abort", f"vLLM stream failed: {exc}")
        finally:
            await self._aclose()

    async def _aclose(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._response.aclose()
            finally:
                self._done()

    def close(self) -> None:
        """Close the upstream answer (vLLM then aborts the request); idempotent."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - always called from the event loop
            return
        task = loop.create_task(self._shut())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _shut(self) -> None:
        try:
            await self._events.aclose()
        finally:
            await self._aclose()  # also when the generator never started


_closing: set[asyncio.Task[None]] = set()  # close() tasks, referenced until they are done


def _upstream_error(status: int, content: bytes) -> UpstreamError:
    """The child's OpenAI-style error answer as an :class:`UpstreamError`."""
    message, type_ = f"vLLM answered {status}", None
    try:
        error = json.loads(content).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            type_ = error.get("type")
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    return UpstreamError(status, message, type_ if isinstance(type_, str) else None)


def child_figures(text: bytes) -> tuple[float, float] | None:
    """(requests waiting, tokens generated) from vLLM's /metrics text, summed over its
    engines; None when there is no text or it does not parse."""
    if not text:
        return None
    waiting = tokens = 0.0
    try:
        for family in text_string_to_metric_families(text.decode("utf-8", "replace")):
            for sample in family.samples:
                if sample.name == "vllm:num_requests_waiting":
                    waiting += sample.value
                elif sample.name == "vllm:generation_tokens_total":
                    tokens += sample.value
    except ValueError:
        return None
    return waiting, tokens
