"""Opt-in: the front with a real vLLM child. Skipped unless ``ASOBA_TEST_VLLM_PYTHON`` names the
python of a venv with vLLM installed (CPU builds work: eager mode, 1 GiB of KV cache).

    ASOBA_TEST_VLLM_PYTHON=/opt/vllm/bin/python pytest -s tests/server/test_vllm_real.py

It streams through the official openai client, asks for ``n=2`` with logprobs, and prints the
single-stream tokens/s measured directly on the child's socket and through the front, in the
same run. ``ASOBA_TEST_VLLM_MODEL`` may name another model directory than the demo model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.server.support import API_KEY, MODEL_NAME, StartServer

VLLM_PYTHON = os.environ.get("ASOBA_TEST_VLLM_PYTHON", "")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="set ASOBA_TEST_VLLM_PYTHON to a venv's python with vLLM"
)
TOKENS = 256


def tok_per_s(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    """Completion tokens per second of one stream, request sent to last byte (vLLM may put
    several tokens in one chunk, so chunks are not counted)."""
    body = {
        "model": MODEL_NAME,
        "prompt": "Hello",
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    started = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    assert tokens == TOKENS
    return tokens / (time.perf_counter() - started)


def test_real_vllm_through_the_front(
    start_server: StartServer, demo_model_dir: Path, tmp_path: Path
) -> None:
    model = Path(os.environ.get("ASOBA_TEST_VLLM_MODEL") or demo_model_dir)
    server = start_server(
        {
            "ASOBA_BACKEND": "vllm",
            "ASOBA_VLLM_PYTHON": VLLM_PYTHON,
            "ASOBA_MODEL_DIR": str(model),
            "ASOBA_MODEL_NAME": MODEL_NAME,
            "ASOBA_MAX_MODEL_LEN": "2048",
            "ASOBA_MAX_NUM_SEQS": "16",
            "ASOBA_KV_CACHE_BYTES": str(1024**3),
            "ASOBA_VLLM_ENFORCE_EAGER": "on",
            "ASOBA_VLLM_SOCKET": str(tmp_path / "v.sock"),
            "ASOBA_MAX_NEW_TOKENS": "1024",
        },
        wait=False,
        api_key=API_KEY,
    )
    server.wait_ready(timeout=300)
    oai = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)
    [card] = oai.models.list().data
    assert card.id == MODEL_NAME and card.model_extra["max_model_len"] == 2048  # type: ignore[index]
    parts = [
        c.choices[0].text
        for c in oai.completions.create(
            model=MODEL_NAME, prompt="Hello", max_tokens=8, stream=True, temperature=0
        )
        if c.choices
    ]
    assert len(parts) >= 2
    both = oai.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=4, n=2, logprobs=2, temperature=1.0
    )
    assert len(both.choices) == 2
    assert both.choices[0].logprobs is not None and both.choices[0].logprobs.top_logprobs
    chat = oai.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant"
    gen = httpx.post(
        server.base_url + "/generate",
        json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert gen.status_code == 200 and gen.json()["usage"]["completion_tokens"] == 4
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert "asoba:http_requests_total" in metrics and "vllm:" in metrics
    types = [line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))

    transport = httpx.HTTPTransport(uds=str(tmp_path / "v.sock"))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(transport=transport, base_url="http://vllm", timeout=300) as direct,
        httpx.Client(base_url=server.base_url, timeout=300) as front,
    ):
        tok_per_s(direct, "/v1/completions", {})  # warm both paths once
        rates = {"direct": [], "front": []}
        for _ in range(5):
            rates["direct"].append(tok_per_s(direct, "/v1/completions", {}))
            rates["front"].append(tok_per_s(front, "/v1/completions", auth))
    print(
        f"\nsingle stream, {TOKENS} tokens, tok/s (5 runs each, alternated): "
        + "; ".join(f"{k}: " + ", ".join(f"{v:.1f}" for v in vs) for k, vs in rates.items())
    )
    assert server.stop(timeout=60) in (0, -15)
