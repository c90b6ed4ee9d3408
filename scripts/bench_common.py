"""What the server benchmarks share: percentiles, the demo model, a server subprocess, one
streamed completion.

Imported by scripts/bench_server.py, scripts/bench_load.py and scripts/bench_engine.py (and,
through them, by tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, limit_s: float, *, poll_s: float = 0.2
) -> None:
    """Until ``url`` answers 200; a server that exits or stays unready past ``limit_s``
    raises (and is killed)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    proc.kill()
    raise RuntimeError(f"{url} did not become ready")


def start_server(
    model_dir: Path,
    port: int,
    env_extra: dict[str, str] | None = None,
    *,
    checkout: Path = REPO,
    ready_s: float = 120.0,
) -> subprocess.Popen[bytes]:
    """``python -m remote_service`` of ``checkout`` on loopback, returned once /health
    answers 200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASOBA_")}
    if checkout != REPO:
        env["PYTHONPATH"] = str(checkout)
    env.update(
        ASOBA_MODEL_DIR=str(model_dir),
        ASOBA_MODEL_NAME="bench",
        ASOBA_HOST="127.0.0.1",
        ASOBA_PORT=str(port),
        ASOBA_LOG_LEVEL="warning",
        HF_HUB_OFFLINE="1",
        **(env_extra or {}),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "remote_service"],
        cwd=checkout,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(proc, f"http://127.0.0.1:{port}/health", ready_s)
    return proc


async def stream_completion(
    client: httpx.AsyncClient,
    prompt: str,
    tokens: int,
    *,
    model: str | None = None,
    stamps: list[float] | None = None,
) -> tuple[int, float, float]:
    """One streamed, greedy ``/v1/completions`` that ignores EOS: (completion tokens,
    seconds, seconds to the first token). ``stamps`` collects the arrival time of every
    token-bearing event."""
    payload: dict[str, object] = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "repetition_penalty": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        payload["model"] = model
    t0 = time.perf_counter()
    first = None
    used = 0
    async with client.stream("POST", "/v1/completions", json=payload) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                now = time.perf_counter()
                first = first if first is not None else now - t0
                if stamps is not None:
                    stamps.append(now)
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
    seconds = time.perf_counter() - t0
    return used, seconds, first if first is not None else seconds


def load_demo_builder() -> object:
    path = REPO / "scripts" / "make_demo_model.py"
    spec = importlib.util.spec_from_file_location("make_demo_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def print_table(
    header: str,
    columns: tuple[str, str, str],
    rows: list[tuple[str, str, str]],
    *,
    markdown: bool,
    widths: tuple[int, int] = (45, 40),
) -> None:
    """Three-column results: a Markdown table (the header as a comment) or aligned text."""
    if markdown:
        print(f"<!-- {header} -->")
        print("| " + " | ".join(columns) + " |")
        print("| --- | --- | --- |")
        for row in rows:
            print(f"| {row[0].strip()} | {row[1]} | {row[2]} |")
    else:
        print(header)
        for row in rows:
            print(f"{row[0]:{widths[0]}s} {row[1]:{widths[1]}s} {row[2]}")
