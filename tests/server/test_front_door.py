"""The front door, against the real server subprocess: what a hostile client can make it
hold (body size, slow connections, connection count), and what real clients send.

Each test sends traffic to 127.0.0.1 only, bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server.support import API_KEY, MODEL_NAME, ServerProcess, StartServer

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def guarded(demo_model_dir: Path, start_server: StartServer) -> ServerProcess:
    """The demo model with short deadlines and a small connection cap, so the tests are quick."""
    return start_server(
        {
            "ASOBA_MODEL_DIR": str(demo_model_dir),
            "ASOBA_MODEL_NAME": MODEL_NAME,
            "ASOBA_MAX_NEW_TOKENS": "64",
            "ASOBA_DEFAULT_MAX_TOKENS": "8",
            "ASOBA_MAX_REQUEST_BYTES": str(1 * MIB),
            "ASOBA_REQUEST_TIMEOUT": "3",
            "ASOBA_MAX_CONNECTIONS": "300",
        },
        api_key=API_KEY,
    )


def rss(server: ServerProcess) -> int:
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def raw_connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Read until the server closes the connection (True) or ``deadline`` passes (False)."""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


# --- bodies ---------------------------------------------------------------------------------


def test_big_declared_body_is_refused_before_it_is_read(guarded: ServerProcess) -> None:
    baseline = rss(guarded)
    sock = raw_connect(guarded)
    started = time.monotonic()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {256 * MIB}\r\n\r\n"
    )
    sock.sendall(head.encode())
    # Start pushing the body as a client would, and keep going while the answer comes back.
    sent = 0
    answer = b""
    sock.settimeout(0.05)
    try:
        while sent < 64 * MIB and time.monotonic() - started < 5:
            with contextlib.suppress(TimeoutError):
                sent += sock.send(b"x" * 65536)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if b"\r\n\r\n" in answer:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    elapsed = time.monotonic() - started
    sock.settimeout(5)
    answer += read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert elapsed < 1.0
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large"
    assert rss(guarded) - baseline < 32 * MIB


def test_chunked_body_is_counted_as_it_arrives(guarded: ServerProcess) -> None:
    baseline = rss(guarded)
    chunk = b"a" * (256 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(64):  # 16 MiB, without a Content-Length
            yield chunk

    started = time.monotonic()
    with httpx.Client(base_url=guarded.base_url, timeout=30) as client:
        try:
            response = client.post(
                "/v1/completions",
                content=body(),
                headers={"Content-Type": "application/json"},
            )
            status = response.status_code
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            status = 413  # the server answered and closed while we were still writing
    assert status == 413
    assert time.monotonic() - started < 5
    assert rss(guarded) - baseline < 32 * MIB


def test_a_body_under_the_cap_still_works(guarded: ServerProcess) -> None:
    prompt = "hello " * 20_000  # about 120 kB
    with guarded.client() as client:
        response = client.post(
            "/v1/completions", json={"prompt": prompt[:100], "max_tokens": 2, "user": prompt}
        )
    assert response.status_code == 200, response.text


# --- slow clients ---------------------------------------------------------------------------


def test_slow_connections_are_closed_and_health_stays_fast(guarded: ServerProcess) -> None:
    socks: list[socket.socket] = []
    for i in range(200):
        sock = raw_connect(guarded)
        # Half trickle their headers, half declare a body and trickle it.
        if i % 2:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        else:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
        socks.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"a")
            stop.wait(1.0)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    latencies = []
    try:
        with httpx.Client(base_url=guarded.base_url, timeout=5) as client:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                t = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.02)
        # The deadline is 3 s from the connection: every one is closed by the server soon
        # after, though each keeps sending.
        end = time.monotonic() + 6.0
        closed = sum(closed_by_server(sock, end) for sock in socks)
    finally:
        stop.set()
        feeder.join(timeout=5)
        for sock in socks:
            sock.close()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert len(latencies) > 20 and p99 < 0.1, f"/health p99 {p99 * 1000:.1f} ms"
    assert closed == len(socks)


def test_a_header_trickler_gets_408(guarded: ServerProcess) -> None:
    sock = raw_connect(guarded)
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert 2.5 < time.monotonic() - started < 6


def test_connections_over_the_cap_get_503_with_retry_after(
    demo_model_dir: Path, start_server: StartServer
) -> None:
    server = start_server(
        {
            "ASOBA_BACKEND": "mock",
            "ASOBA_MAX_CONNECTIONS": "20",
            "ASOBA_REQUEST_TIMEOUT": "30",
        }
    )
    socks = [raw_connect(server) for _ in range(20)]
    try:
        time.sleep(0.3)
        with httpx.Client(base_url=server.base_url, timeout=5) as client:
            response = client.get("/health")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200


# --- what real clients send ---------------------------------------------------------------


def test_unknown_fields_are_ignored_and_named(
    client: httpx.Client, live_server: ServerProcess
) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi", "refusal": None}],
            "max_tokens": 2,
            "store": False,
            "metadata": {"a": "b"},
            "service_tier": "auto",
            "reasoning_effort": "low",
            "prompt_cache_key": "k",
            "modalities": ["text"],
            "stream_options": None,
        },
    )
    assert response.status_code == 200, response.text
    ignored = set(response.headers["x-ignored-fields"].split(", "))
    assert ignored == {
        "store",
        "metadata",
        "service_tier",
        "reasoning_effort",
        "prompt_cache_key",
        "modalities",
        "messages[].refusal",
    }
    again = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "store": True})
    assert again.status_code == 200 and again.headers["x-ignored-fields"] == "store"
    log = live_server.log()
    assert log.count("ignoring unknown request field 'store' ") == 1


def test_any_field_name_makes_a_valid_header(client: httpx.Client) -> None:
    response = client.post(
        "/v1/completions",
        json={"prompt": "hi", "max_tokens": 1, "": 1, " x\n": 2, "é": 3, "a,b": 4},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-ignored-fields"] == '"", %20x%0A, %C3%A9, a%2Cb'


def test_known_but_unsupported_fields_are_still_a_clear_400(client: httpx.Client) -> None:
    for field, value in (("n", 2), ("logit_bias", {"1": 2.0}), ("presence_penalty", 0.5)):
        response = client.post("/v1/completions", json={"prompt": "hi", field: value})
        assert response.status_code == 400, (field, response.text)
        assert response.json()["error"]["param"] == field


def test_continuous_usage_stats(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/v1/completions",
        json={
            "prompt": "hello",
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    ) as response:
        assert response.status_code == 200
        events = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    with_text = [e for e in events if e["choices"]]
    assert with_text and all("usage" in e for e in with_text)
    counts = [e["usage"]["completion_tokens"] for e in with_text]
    assert counts == sorted(counts) and counts[-1] == 4
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_list_of_prompts_and_token_ids(client: httpx.Client) -> None:
    response = client.post(
        "/v1/completions",
        json={
            "prompt": ["one", "two two", "three three three"],
            "max_tokens": 3,
            "ignore_eos": True,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 9
    ids = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
    assert ids.status_code == 200 and len(ids.json()["choices"]) == 1
    many = client.post("/v1/completions", json={"prompt": [[1, 2], [3]], "max_tokens": 2})
    assert many.status_code == 200 and len(many.json()["choices"]) == 2
    bad = client.post("/v1/completions", json={"prompt": [10**9], "max_tokens": 2})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_list_of_prompts_streams_every_index(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/v1/completions",
        json={"prompt": ["a", "b"], "max_tokens": 3, "ignore_eos": True, "stream": True},
    ) as response:
        events = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    finishes = {
        e["choices"][0]["index"]: e["choices"][0]["finish_reason"]
        for e in events
        if e["choices"][0]["finish_reason"]
    }
    assert finishes == {0: "length", 1: "length"}


def test_request_ids(client: httpx.Client) -> None:
    mine = client.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    fresh = client.get("/health")
    assert len(fresh.headers["x-request-id"]) == 32
    hostile = client.get("/health", headers={"x-request-id": "a" * 500})
    assert hostile.headers["x-request-id"] != "a" * 500


def test_model_by_id(client: httpx.Client) -> None:
    card = client.get(f"/v1/models/{MODEL_NAME}")
    assert card.status_code == 200 and card.json()["id"] == MODEL_NAME
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_template_kwargs_that_collide_are_400(client: httpx.Client) -> None:
    for kwargs in ({"messages": []}, {"self": 1}, {"conversation": []}):
        response = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "chat_template_kwargs": kwargs,
            },
        )
        assert response.status_code == 400, (kwargs, response.text)


def test_a_forged_log_line_stays_on_one_line(
    client: httpx.Client, live_server: ServerProcess
) -> None:
    client.get("/nothing%0A2026-01-01 00:00:00 INFO remote_service.access: forged")
    lines = [ln for ln in live_server.log().splitlines() if "forged" in ln]
    assert lines and all("/nothing\\x0a" in ln for ln in lines)


def test_stop_strings_are_bounded(client: httpx.Client) -> None:
    long = client.post("/v1/completions", json={"prompt": "hi", "stop": "x" * 300})
    assert long.status_code == 400 and long.json()["error"]["param"] == "stop"
    ok = client.post("/v1/completions", json={"prompt": "hi", "stop": ["x" * 256], "max_tokens": 2})
    assert ok.status_code == 200


def test_tool_message_needs_its_call_id(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}, {"role": "tool"}]},
    )
    assert response.status_code == 400


def test_api_docs_are_off_unless_asked_for(start_server: StartServer) -> None:
    server = start_server({"ASOBA_BACKEND": "mock"})
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.base_url + path, timeout=5).status_code == 404, path
    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200


def test_cors_is_off_unless_configured(client: httpx.Client, start_server: StartServer) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert (
        "access-control-allow-origin"
        not in client.options("/v1/completions", headers=preflight).headers
    )
    server = start_server({"ASOBA_BACKEND": "mock", "ASOBA_CORS_ORIGINS": "https://app.example"})
    answer = httpx.options(server.base_url + "/v1/completions", headers=preflight, timeout=5)
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


def test_langchain_batch_and_chat_streaming(live_server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI, OpenAI

    common = {
        "base_url": live_server.base_url + "/v1",
        "api_key": live_server.api_key,
        "model": MODEL_NAME,
        "max_tokens": 4,
        "max_retries": 0,
        "timeout": 60,
    }
    # .batch() of the completions LLM sends every prompt in one request.
    outputs = OpenAI(**common).batch(["one", "two", "three"])
    assert len(outputs) == 3 and all(isinstance(text, str) for text in outputs)
    chunks = list(ChatOpenAI(**common, streaming=True).stream("hello"))
    assert chunks and all(chunk.type == "AIMessageChunk" for chunk in chunks)


def test_openai_sdk_with_fields_it_exposes(live_server: ServerProcess) -> None:
    from openai import OpenAI

    oai = OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.api_key, max_retries=0)
    chat = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        store=False,
        metadata={"team": "ml"},
        service_tier="auto",
        reasoning_effort="low",
        prompt_cache_key="k1",
        modalities=["text"],
        extra_body={"min_tokens": 0},
    )
    assert chat.choices[0].message.role == "assistant"
    stream = oai.completions.create(
        model=MODEL_NAME,
        prompt="hi",
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    )
    assert [chunk for chunk in stream]


def test_openapi_declares_security_only_with_a_key(
    client: httpx.Client, start_server: StartServer
) -> None:
    keyed = client.get("/openapi.json").json()
    assert keyed["components"]["securitySchemes"]
    server = start_server({"ASOBA_BACKEND": "mock", "ASOBA_API_DOCS": "true"})
    open_doc = httpx.get(server.base_url + "/openapi.json", timeout=5).json()
    assert "securitySchemes" not in open_doc.get("components", {})
    assert all(
        "security" not in op and "401" not in op.get("responses", {})
        for path in open_doc["paths"].values()
        for op in path.values()
    )
