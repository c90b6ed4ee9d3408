"""The real server (uvicorn subprocess, demo model on CPU): exact shapes of every endpoint."""

from __future__ import annotations

import re
from datetime import datetime

import httpx
import pytest

from remote_service.api import sse
from tests.server.support import MODEL_NAME, ServerProcess

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello!"}]}


def is_iso(ts: str) -> bool:
    datetime.fromisoformat(ts)
    return "T" in ts


def test_health(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"status", "timestamp"}
    assert body["status"] == "ok" and is_iso(body["timestamp"])
    assert client.get("/health/live").json()["status"] == "alive"
    assert client.get("/health/ready").json()["status"] == "ok"


def test_status_has_the_monitor_format(client: httpx.Client, live_server: ServerProcess) -> None:
    body = client.get("/status").json()
    monitor = {
        "status": str,
        "model": str,
        "gpu_memory_used": int,
        "gpu_memory_total": int,
        "ram_usage_gb": float,
        "port": int,
        "timestamp": str,
        "service": str,
    }
    for key, typ in monitor.items():
        assert isinstance(body[key], typ), (key, body[key])
    assert body["status"] == "healthy"
    assert body["service"] == "asoba-inference"
    assert body["model"] == MODEL_NAME
    assert body["port"] == live_server.port
    assert (body["gpu_memory_used"], body["gpu_memory_total"]) == (0, 0)  # no GPU here
    assert body["ram_usage_gb"] > 0 and is_iso(body["timestamp"])
    assert body["backend"] == "transformers" and body["engine"] == "transformers"
    assert (body["device"], body["dtype"], body["quantization"]) == ("cpu", "float32", "none")
    assert body["load_time_s"] > 0 and body["warmup_time_s"] >= 0
    assert body["max_num_seqs"] == 16 and body["max_model_len"] == 2048


def test_info(client: httpx.Client) -> None:
    body = client.get("/").json()
    assert body["service"] == "asoba-inference"
    assert body["model"] == MODEL_NAME
    assert body["auth"] is True
    assert {"python", "torch", "transformers", "fastapi", "uvicorn"} <= set(body["versions"])
    assert {"/generate", "/status", "/health", "/v1/models"} <= set(body["endpoints"])


def test_models(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL_NAME and card["object"] == "model"
    assert isinstance(card["created"], int) and card["owned_by"]


def test_generate(client: httpx.Client) -> None:
    r = client.post("/generate", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0.7})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"choices", "usage", "model", "created", "id"}
    [choice] = body["choices"]
    assert set(choice) == {"text", "finish_reason"}
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert body["model"] == MODEL_NAME
    assert isinstance(body["created"], int)
    assert re.fullmatch(r"gen-\d{8}-\d{6}-[0-9a-f]{8}", body["id"])


def test_completion(client: httpx.Client) -> None:
    body = client.post(
        "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 5}
    ).json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["index"] == 0
    assert set(body["choices"][0]) == {"index", "text", "finish_reason", "logprobs"}
    assert body["usage"]["completion_tokens"] <= 5


def test_completion_stream(client: httpx.Client) -> None:
    payload = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 6, "stream": True}
    r = client.post("/v1/completions", json=payload)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse.parse(r.content)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_completion(client: httpx.Client) -> None:
    body = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5}).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert set(choice) == {"index", "message", "finish_reason", "logprobs"}
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    # ChatML: <|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n
    assert body["usage"]["prompt_tokens"] > 5


def test_chat_accepts_content_as_a_list_of_text_parts(client: httpx.Client) -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]
    as_parts = {**CHAT, "messages": [{"role": "user", "content": parts}], "max_tokens": 3}
    plain = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3}).json()
    listed = client.post("/v1/chat/completions", json=as_parts).json()
    assert listed["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_chat_stream_with_usage(client: httpx.Client) -> None:
    payload = {
        **CHAT,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse.parse(client.post("/v1/chat/completions", json=payload).content)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] in {"stop", "length"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 6


def test_stop_sequence_is_not_returned(client: httpx.Client) -> None:
    base = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 30, "temperature": 0}
    full = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[5:8]
    assert stop.strip()
    cut = client.post("/v1/completions", json={**base, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]


def metric(client: httpx.Client, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move(client: httpx.Client) -> None:
    names = [
        "asoba:request_success_total",
        "asoba:prompt_tokens_total",
        "asoba:generation_tokens_total",
        "asoba:time_to_first_token_seconds_count",
        "asoba:inter_token_latency_seconds_count",
        "asoba:e2e_request_latency_seconds_count",
        "asoba:http_requests_total",
    ]
    before = {n: metric(client, n) for n in names}
    r = client.post("/generate", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    after = {n: metric(client, n) for n in names}
    for n in names:
        assert after[n] > before[n], n
    text = client.get("/metrics").text
    for gauge in ("asoba:num_requests_running", "asoba:num_requests_waiting"):
        assert f'{gauge}{{model_name="{MODEL_NAME}"}}' in text
    assert 'route="/generate"' in text


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/generate", {"prompt": ""}, 400, "prompt"),
        ("/generate", {}, 400, "prompt"),
        ("/generate", {"prompt": 5}, 400, "prompt"),
        ("/generate", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ("/generate", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/generate", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ("/generate", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
        ("/generate", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/generate", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/generate", {"prompt": "x " * 3000}, 400, "prompt"),
        ("/generate", {"prompt": "x", "seed": 2**60}, 400, "seed"),
        ("/generate", [1, 2], 400, None),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"prompt": ["a"] * 33}, 400, "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, None),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"},
            },
            400,
            "chat_template_kwargs",
        ),
    ],
)
def test_bad_input_is_a_4xx_openai_error(
    client: httpx.Client, path: str, body: object, status: int, param: str | None
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"prompt": "x"', {"content-type": "application/json"}),
        (b"not json at all", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}),
        (b"\xff\xfe", {"content-type": "application/json"}),
    ],
)
def test_malformed_bodies_are_400(client: httpx.Client, content: bytes, headers: dict) -> None:
    r = client.post("/generate", content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_context_overflow_is_400(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "word " * 2100, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
