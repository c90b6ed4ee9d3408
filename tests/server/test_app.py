"""The app in-process (TestClient, lifespan on) with mock and fake engines: no model, fast."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from remote_service.api import routes_generate, routes_health, routes_openai
from remote_service.app import create_app
from remote_service.engine import EngineLoadError, GenerationRequest, QueueFullError
from remote_service.engine.base import DeltaIterator
from remote_service.engine.batched import Loaded
from remote_service.engine.mock import MockEngine
from remote_service.settings import Settings

KEY = "k-123"


class GatedEngine(MockEngine):
    """A mock whose load waits for ``gate``, then optionally fails."""

    def __init__(self, settings: Settings, fail: str | None = None) -> None:
        super().__init__(settings)
        self.gate = threading.Event()
        self.fail = fail

    def _load_model(self) -> Loaded:
        assert self.gate.wait(30)
        if self.fail:
            raise EngineLoadError(self.fail)
        return super()._load_model()


class BusyEngine(MockEngine):
    """Every generation request finds the queue full."""

    async def stream(self, request: GenerationRequest) -> DeltaIterator:
        raise QueueFullError("server busy: 4 running, 16 waiting", retry_after_s=2)


def wait_ready(client: TestClient, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.01)


@pytest.fixture
def mock_client() -> Iterator[TestClient]:
    settings = Settings(backend="mock", model_name="mock-model", mock_token_delay=0)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_health_is_503_loading_until_the_engine_is_ready() -> None:
    settings = Settings(backend="mock", api_key=KEY)  # type: ignore[arg-type]
    engine = GatedEngine(settings)
    with TestClient(create_app(settings, engine)) as c:
        r = c.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        assert c.get("/health/ready").status_code == 503
        assert c.get("/health/live").json()["status"] == "alive"
        status = c.get("/status")
        assert status.status_code == 503
        assert status.json()["status"] == "loading"
        gen = c.post("/generate", json={"prompt": "hi"}, headers={"X-API-Key": KEY})
        assert gen.status_code == 503
        assert gen.json()["error"]["type"] == "service_unavailable"
        assert int(gen.headers["Retry-After"]) >= 1  # clients back off instead of hammering
        engine.gate.set()
        wait_ready(c)
        body = c.get("/health").json()
        assert set(body) == {"status", "timestamp"} and body["status"] == "ok"
        assert c.get("/status").json()["status"] == "healthy"


def test_a_failed_load_reports_error_with_the_reason() -> None:
    settings = Settings(backend="mock")
    engine = GatedEngine(settings, fail="ASOBA_MODEL_DIR=/x has no config.json")
    engine.gate.set()
    with TestClient(create_app(settings, engine)) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "error"
        assert "has no config.json" in r.json()["detail"]
        assert c.get("/status").json()["status"] == "error"


def test_mock_backend_is_reported_as_mock(mock_client: TestClient) -> None:
    status = mock_client.get("/status").json()
    assert status["backend"] == "mock"
    assert status["model"] == "mock-model"
    info = mock_client.get("/").json()
    assert info["backend"] == "mock"
    assert "/v1/chat/completions" in info["endpoints"]


def test_mock_echo_through_the_api(mock_client: TestClient) -> None:
    r = mock_client.post("/generate", json={"prompt": "one two three", "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"] == [{"text": " one two three one", "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    stop = mock_client.post(
        "/v1/completions", json={"prompt": "one two three", "max_tokens": 9, "stop": ["three"]}
    ).json()
    assert stop["choices"][0]["text"] == " one two "
    assert stop["choices"][0]["finish_reason"] == "stop"


def test_reasoning_keep_returns_the_think_block_in_content(mock_client: TestClient) -> None:
    msg = {"role": "user", "content": "<think> plan </think> answer"}
    r = mock_client.post("/v1/chat/completions", json={"messages": [msg], "max_tokens": 4})
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": " <think> plan </think> answer"}


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_split_moves_the_think_block(stream: bool) -> None:
    settings = Settings(backend="mock", reasoning="split", mock_token_delay=0)
    msg = {"role": "user", "content": "<think> plan it </think> the answer"}
    body = {"messages": [msg], "max_tokens": 6, "stream": stream}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        if stream:
            from remote_service.api import sse

            chunks = [e for e in sse.parse(r.content) if isinstance(e, dict)]
            deltas = [ch["choices"][0]["delta"] for ch in chunks]
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
            content = "".join(d.get("content", "") for d in deltas)
        else:
            message = r.json()["choices"][0]["message"]
            reasoning, content = message["reasoning_content"], message["content"]
    assert reasoning.strip() == "plan it"
    assert content.strip() == "the answer"


def test_full_queue_is_429_with_retry_after() -> None:
    settings = Settings(backend="mock")
    with TestClient(create_app(settings, BusyEngine(settings))) as c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/generate", {"prompt": "hi"}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "hi"}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_api_key_guards_generation_routes(method: str, path: str, body: Any) -> None:
    settings = Settings(backend="mock", api_key=KEY, mock_token_delay=0)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            assert c.request(method, path, json=body, headers=headers).status_code == 200
        for open_path in ("/health", "/health/live", "/status", "/metrics", "/"):
            assert c.get(open_path).status_code == 200, open_path


def test_unknown_route_and_method_are_openai_errors(mock_client: TestClient) -> None:
    r = mock_client.get("/v2/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
    r = mock_client.get("/generate")
    assert r.status_code == 405
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_no_route_dependency_needs_the_thread_pool() -> None:
    """FastAPI runs a plain ``def`` dependency in its thread pool: a hand-off per request that,
    under a flood of requests, holds the GIL the generation thread needs. Ours are async."""

    def calls(dependant: Dependant) -> Iterator[Any]:
        for dep in dependant.dependencies:
            yield dep.call
            yield from calls(dep)

    seen, sync = set(), set()
    for router in (routes_generate.router, routes_openai.router, routes_health.router):
        for route in router.routes:
            assert isinstance(route, APIRoute)
            for call in calls(route.dependant):
                fn = call if inspect.isfunction(call) else type(call).__call__
                seen.add(getattr(call, "__name__", type(call).__name__))
                if not inspect.iscoroutinefunction(fn):
                    sync.add(f"{route.path}: {getattr(call, '__name__', call)}")
    assert {"require_api_key", "get_serving", "get_settings", "HTTPBearer"} <= seen
    assert sync == set()
