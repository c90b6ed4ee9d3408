#!/usr/bin/env python3
"""Benchmark the inference server against plain ``model.generate()``, in one run.

Measures, on the same checkpoint and the same prompt:

1. single-stream tokens/s of an in-process ``model.generate()`` loop (no server) and of one
   streamed ``/v1/completions`` request through the server: the ratio is the server overhead;
2. aggregate tokens/s with 1, 4 and 16 concurrent streams: the batching gain;
3. ``/health`` latency (p50/p99) when idle and while 16 streams generate.

Without ``--model-dir`` it builds the demo model (scripts/make_demo_model.py) in a temp dir.
Figures from a tiny random model on CPU are not representative of a real model on a GPU: read
the ratios, not the absolute tokens/s.

    python scripts/bench_server.py [--model-dir DIR] [--tokens 128] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    free_port,
    load_demo_builder,
    percentile,
    print_table,
    start_server,
    stream_completion,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = (
    "The inference service loads safetensors shards from disk straight onto the GPU, then "
    "answers requests while health checks keep answering."
)


@dataclass
class StreamResult:
    tokens: int
    seconds: float
    ttft: float


# --- baseline: model.generate() in this process ----------------------------------------------


class Baseline:
    """``model.generate()`` in this process: same checkpoint, dtype, prompt, token count."""

    def __init__(self, model_dir: Path, tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self._model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, local_files_only=True
        ).eval()
        self._ids = tok(PROMPT, return_tensors="pt")
        self._kwargs = {
            "max_new_tokens": tokens,
            "min_new_tokens": tokens,
            "do_sample": False,
            "repetition_penalty": 1.0,
        }
        self.run()  # warm-up

    def run(self) -> float:
        """Tokens/s of one generation."""
        with self._torch.inference_mode():
            t0 = time.perf_counter()
            out = self._model.generate(**self._ids, **self._kwargs)
            n = out.shape[1] - self._ids["input_ids"].shape[1]
            return n / (time.perf_counter() - t0)


# --- the server --------------------------------------------------------------------------------


async def one_stream(client: httpx.AsyncClient, tokens: int) -> StreamResult:
    # repetition_penalty 1.0, greedy: as in the baseline
    return StreamResult(*await stream_completion(client, PROMPT, tokens))


async def concurrent(base: str, streams: int, tokens: int) -> tuple[float, float]:
    """Aggregate tokens/s and median TTFT with ``streams`` simultaneous streams."""
    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return sum(r.tokens for r in results) / wall, statistics.median(r.ttft for r in results)


async def health_latencies(base: str, seconds: float, interval: float) -> list[float]:
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await client.get("/health")
            out.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"/health answered {r.status_code}")
            await asyncio.sleep(interval)
    return out


async def health_under_load(base: str, streams: int, tokens: int) -> list[float]:
    out: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = await client.get("/health")
                out.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"/health answered {r.status_code}")
                await asyncio.sleep(0.02)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    await concurrent(base, streams, tokens)
    stop.set()
    await task
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="checkpoint (default: build demo-tiny)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--runs", type=int, default=5, help="repeats of each measurement")
    parser.add_argument(
        "--load-tokens", type=int, default=512, help="tokens per stream while probing /health"
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)

    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-")
        model_dir = Path(tmp.name) / "demo-tiny"
        load_demo_builder().make_demo_model(model_dir)  # type: ignore[attr-defined]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print("starting the server ...", file=sys.stderr)
    proc = start_server(model_dir, port, {"ASOBA_MAX_NUM_SEQS": "16"})
    try:
        baseline = Baseline(model_dir, args.tokens)
        asyncio.run(concurrent(base, 1, 16))  # warm the connection path
        # Interleaved, so that a noisy neighbour hurts both sides alike; medians reported.
        base_runs, server_runs = [], []
        for _ in range(args.runs):
            base_runs.append(baseline.run())
            server_runs.append(asyncio.run(concurrent(base, 1, args.tokens))[0])
        base_tps, server_tps = statistics.median(base_runs), statistics.median(server_runs)
        agg = {}
        for n in (1, 4, 16):
            runs = [asyncio.run(concurrent(base, n, args.tokens)) for _ in range(args.runs)]
            agg[n] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )
        idle = asyncio.run(health_latencies(base, seconds=5.0, interval=0.01))
        loaded: list[float] = []
        for _ in range(args.runs):
            loaded += asyncio.run(health_under_load(base, 16, args.load_tokens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        if tmp is not None:
            tmp.cleanup()

    ms = 1000.0
    rows = [
        ("single stream, model.generate() in-process", f"{base_tps:.0f} tok/s", "1.00x"),
        (
            "single stream through the server (SSE)",
            f"{server_tps:.0f} tok/s",
            f"{server_tps / base_tps:.2f}x of generate()",
        ),
    ]
    for n, (tps, ttft) in agg.items():
        rows.append(
            (
                f"{n} concurrent streams, aggregate",
                f"{tps:.0f} tok/s (TTFT p50 {ttft * ms:.0f} ms)",
                f"{tps / agg[1][0]:.2f}x of 1 stream",
            )
        )
    rows.append(
        (
            "/health idle",
            f"p50 {percentile(idle, 50) * ms:.1f} ms, p99 {percentile(idle, 99) * ms:.1f} ms",
            f"n={len(idle)}",
        )
    )
    rows.append(
        (
            "/health under 16 streams",
            f"p50 {percentile(loaded, 50) * ms:.1f} ms, p99 {percentile(loaded, 99) * ms:.1f} ms",
            f"n={len(loaded)}",
        )
    )
    header = (
        f"model={model_dir.name} tokens/stream={args.tokens} runs={args.runs} (medians) "
        f"python={platform.python_version()} cpus={os.cpu_count()}"
    )
    print_table(header, ("measurement", "result", "ratio"), rows, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
