"""A stand-in for ``python -m vllm.entrypoints.openai.api_server``: same argv, a unix socket.

Run as ``python fake_vllm.py -m vllm.entrypoints.openai.api_server --model DIR --uds SOCK ...``
(tests point ASOBA_VLLM_PYTHON at a wrapper that does this), so the server's real child
management starts, watches and stops it. Tokens are whitespace-separated words; a completion
is ``t0 t1 t2 ...``, one word per ``FAKE_VLLM_TOKEN_DELAY`` seconds.

Environment:

- ``FAKE_VLLM_RECORD``: write ``{"argv", "env", "pid"}`` there as JSON at start.
- ``FAKE_VLLM_EVENTS``: append one line per event there (``stream-closed ID`` when a stream
  ends before its last chunk because the client left).
- ``FAKE_VLLM_READY_DELAY``: seconds ``/health`` answers 503 before 200.
- ``FAKE_VLLM_EXIT_AT_START``: print it to stderr and exit 1 before serving.
- ``FAKE_VLLM_TOKEN_DELAY``: seconds per streamed token (default 0.01).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

STARTED = time.monotonic()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("-m", dest="module", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--uds", required=True)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--dtype")
    p.add_argument("--generation-config")
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--quantization")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--distributed-executor-backend", choices=["uni", "mp", "ray"])
    p.add_argument("--enable-auto-tool-choice", action="store_true")
    p.add_argument("--tool-call-parser")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    args = p.parse_args(argv)
    assert args.module == "vllm.entrypoints.openai.api_server", args.module
    return args


def event(line: str) -> None:
    path = os.environ.get("FAKE_VLLM_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def make_app(args: argparse.Namespace) -> FastAPI:
    app = FastAPI()
    ready_after = float(os.environ.get("FAKE_VLLM_READY_DELAY", "0"))
    delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY", "0.01"))
    name = args.served_model_name
    made = [0]  # tokens generated, as vLLM counts them

    @app.get("/health")
    async def health() -> PlainTextResponse:
        ok = time.monotonic() - STARTED >= ready_after
        return PlainTextResponse("", status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": "0.0-fake"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": name, "object": "model", "max_model_len": args.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await request.json()
        tokens = [len(w) for w in str(body["prompt"]).split()]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": args.max_model_len}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = (
            "# HELP python_gc_objects_collected_total Objects collected during gc\n"
            "# TYPE python_gc_objects_collected_total counter\n"
            'python_gc_objects_collected_total{generation="0"} 1.0\n'
            "# HELP process_cpu_seconds_total Total user and system CPU time\n"
            "# TYPE process_cpu_seconds_total counter\n"
            "process_cpu_seconds_total 1.5\n"
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{name}"}} 0.0\n'
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="{name}"}} 2.0\n'
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{engine="0",model_name="{name}"}} {float(made[0])}\n'
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def check(body: dict[str, Any]) -> JSONResponse | None:
        if body.get("model") not in (None, name):
            err = {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}
            return JSONResponse({"error": {**err, "type": "NotFoundError"}}, status_code=404)
        return None

    async def words(n: int, rid: str) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(delay)
            made[0] += 1
            yield f" t{i}"

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        if (bad := check(body)) is not None:
            return bad
        n = int(body.get("max_tokens") or 16)
        prompt = body.get("prompt")
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        rid = request.headers.get("x-request-id", "cmpl-fake")
        event(f"completion {rid} {json.dumps(body, sort_keys=True)}")
        base = {"id": rid, "object": "text_completion", "created": 0, "model": name}
        if not body.get("stream"):
            text = "".join([w async for w in words(n, rid)])
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
            choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
            return JSONResponse({**base, "choices": [choice], "usage": usage})

        async def sse() -> AsyncIterator[bytes]:
            done = False
            try:
                i = 0
                async for w in words(n, rid):
                    i += 1
                    finish = "length" if i == n else None
                    choice = {"index": 0, "text": w, "finish_reason": finish, "logprobs": None}
                    chunk: dict[str, Any] = {**base, "choices": [choice]}
                    if (body.get("stream_options") or {}).get("continuous_usage_stats"):
                        chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": i}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"
                done = True
            finally:
                if not done:
                    event(f"stream-closed {rid}")

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        if (bad := check(body)) is not None:
            return bad
        n = int(body.get("max_tokens") or 16)
        base = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": name}
        if not body.get("stream"):
            text = "".join([w async for w in words(n, "chat")])
            msg = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": msg, "finish_reason": "length"}
            return JSONResponse({**base, "choices": [choice]})

        async def sse() -> AsyncIterator[bytes]:
            async for w in words(n, "chat"):
                choice = {"index": 0, "delta": {"content": w}, "finish_reason": None}
                chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def watch_parent() -> None:
    """Exit when the server that started us is gone (no orphan if a test kills it)."""
    parent = os.getppid()
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            os._exit(0)


def main() -> None:
    args = parse(sys.argv[1:])
    record = os.environ.get("FAKE_VLLM_RECORD")
    if record:
        with open(record, "w") as f:
            json.dump({"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid()}, f)
    print(f"INFO fake vLLM starting for {args.served_model_name}", flush=True)
    message = os.environ.get("FAKE_VLLM_EXIT_AT_START")
    if message:
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1)
    threading.Thread(target=watch_parent, daemon=True).start()
    uvicorn.run(make_app(args), uds=args.uds, log_level="warning")


if __name__ == "__main__":
    main()
