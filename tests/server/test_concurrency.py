"""Under load the server stays responsive, and a client that leaves frees its slot."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from remote_service.api import sse
from tests.server.support import MODEL_NAME, ServerProcess, StartServer

N_STREAMS = 16


async def _stream_chat(client: httpx.AsyncClient, i: int) -> list[object]:
    payload = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": f"Request number {i}: tell me a long story."}],
        "max_tokens": 200,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
    }
    body = b""
    async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200
        async for chunk in r.aiter_bytes():
            body += chunk
    return sse.parse(body)


async def _probe(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        t0 = time.perf_counter()
        r = await client.get("/health")
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200
        await asyncio.sleep(0.05)
    return latencies


def test_health_answers_while_16_streams_generate(live_server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {live_server.api_key}"}

    async def go() -> tuple[list[list[object]], list[float], int]:
        limits = httpx.Limits(max_connections=N_STREAMS + 4)
        async with (
            httpx.AsyncClient(
                base_url=live_server.base_url, headers=headers, timeout=120, limits=limits
            ) as streams,
            httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as probe,
        ):
            stop = asyncio.Event()
            probe_task = asyncio.create_task(_probe(probe, stop))
            await asyncio.sleep(0.1)
            tasks = [asyncio.create_task(_stream_chat(streams, i)) for i in range(N_STREAMS)]
            peak = 0
            while not all(t.done() for t in tasks):
                status = (await probe.get("/status")).json()
                peak = max(peak, status["requests_running"])
                await asyncio.sleep(0.05)
            stop.set()
            return [t.result() for t in tasks], await probe_task, peak

    results, latencies, peak = asyncio.run(go())
    for events in results:
        assert events[-1] == "[DONE]"
        chunks = [e for e in events if isinstance(e, dict)]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(latencies) >= 3
    # Generous bound: the point is that probes are answered during generation, not timing.
    assert max(latencies) < 5.0, max(latencies)
    assert peak > 1, "requests were never batched together"


def test_a_disconnected_stream_frees_its_slot(start_server: StartServer) -> None:
    server = start_server(
        {"ASOBA_BACKEND": "mock", "ASOBA_MOCK_TOKEN_DELAY": "0.02", "ASOBA_MAX_NEW_TOKENS": "5000"}
    )
    payload = {"prompt": "a b c", "max_tokens": 5000, "stream": True}
    with server.client() as c:
        with c.stream("POST", "/v1/completions", json=payload) as r:
            next(r.iter_bytes())
            assert c.get("/status").json()["requests_running"] == 1
        # leaving the block closed the connection mid-stream (5000 tokens take ~100 s)
        deadline = time.monotonic() + 10
        while c.get("/status").json()["requests_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/status").json()["requests_running"] == 0
        metrics = c.get("/metrics").text
        assert 'asoba:request_success_total{finished_reason="abort"' in metrics


def test_a_disconnected_non_streaming_request_frees_its_slot(start_server: StartServer) -> None:
    server = start_server(
        {"ASOBA_BACKEND": "mock", "ASOBA_MOCK_TOKEN_DELAY": "0.02", "ASOBA_MAX_NEW_TOKENS": "5000"}
    )
    with server.client() as c:
        with contextlib.suppress(httpx.ReadTimeout):  # the client gives up: a disconnect
            c.post("/generate", json={"prompt": "a b", "max_tokens": 5000}, timeout=0.5)
        deadline = time.monotonic() + 10
        while c.get("/status").json()["requests_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/status").json()["requests_running"] == 0


def test_full_queue_answers_429_with_retry_after(start_server: StartServer) -> None:
    server = start_server(
        {
            "ASOBA_BACKEND": "mock",
            "ASOBA_MOCK_TOKEN_DELAY": "0.02",
            "ASOBA_MAX_NUM_SEQS": "1",
            "ASOBA_MAX_QUEUE": "0",
            "ASOBA_MAX_NEW_TOKENS": "5000",
        }
    )
    payload = {"prompt": "a b c", "max_tokens": 5000, "stream": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=payload) as r:
        chunks = r.iter_bytes()  # kept: a dropped iterator would close the stream
        next(chunks)
        busy = c.post("/v1/completions", json={"prompt": "x"})
        assert busy.status_code == 429
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["type"] == "rate_limit_exceeded"
        assert c.get("/health").status_code == 200


def test_a_client_that_gives_up_while_queued_frees_its_place(start_server: StartServer) -> None:
    server = start_server(
        {
            "ASOBA_BACKEND": "mock",
            "ASOBA_MOCK_TOKEN_DELAY": "0.02",
            "ASOBA_MAX_NUM_SEQS": "1",
            "ASOBA_MAX_QUEUE": "1",
            "ASOBA_MAX_NEW_TOKENS": "5000",
        }
    )
    payload = {"prompt": "a b c", "max_tokens": 5000, "stream": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=payload) as r:
        chunks = r.iter_bytes()  # kept: a dropped iterator would close the stream
        next(chunks)  # it holds the only slot for ~100 s
        with contextlib.suppress(httpx.ReadTimeout):  # queued behind it, then the client leaves
            c.post("/generate", json={"prompt": "x y", "max_tokens": 5}, timeout=0.5)
        deadline = time.monotonic() + 10
        while c.get("/status").json()["requests_waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/status").json()["requests_waiting"] == 0
        # The queue place is free again although the slot is still busy: queued, not 429.
        with c.stream("POST", "/v1/completions", json={**payload, "max_tokens": 5}) as queued:
            assert queued.status_code == 200
            assert c.get("/status").json()["requests_waiting"] == 1
