#!/usr/bin/env python3
"""Benchmark the two engines and vLLM itself, side by side, in one run, on one checkpoint.

Three servers on the same model directory, visited in turns (each round measures every
server, so a busy neighbour slows all alike):

- ``transformers``: this checkout's server with its own engine;
- ``front+vllm``: this checkout's server with ``ASOBA_BACKEND=vllm``: vLLM as its child on a
  unix socket, behind the service's front (API key, limits, /status, /metrics);
- ``vllm``: that same vLLM child called directly on its unix socket (one vLLM process, so
  the difference between the two is the front alone).

For 1 and ``--streams`` streams x ``--short`` and ``--long`` tokens (streamed greedy
``/v1/completions``, EOS ignored): median time to the first token and aggregate completion
tokens/s, and the ratios ``front+vllm / vllm`` (the front's overhead; the goal is at most 5%
at one stream) and ``transformers / vllm``.

    python scripts/bench_engines.py --vllm-python /path/to/vllm-venv/bin/python --markdown

On a tiny model on CPU the absolute figures measure per-token bookkeeping: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, load_demo_builder, print_table
from bench_engine import MODEL, Server, spread, start_ours, stream
from bench_server import PROMPT


async def one_load(
    base: str, streams: int, tokens: int, uds: str | None = None
) -> tuple[float, float]:
    """(aggregate completion tokens/s, median seconds to the first token) of ``streams``
    simultaneous streams of ``tokens`` tokens (over the unix socket ``uds`` when given)."""
    limits = httpx.Limits(max_connections=streams + 2)
    transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
    async with httpx.AsyncClient(
        base_url=base, timeout=900, limits=limits, transport=transport
    ) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(stream(client, PROMPT, tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return sum(n for n, _ in done) / wall, statistics.median(t for _, t in done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="python of a venv with vLLM")
    parser.add_argument("--model-dir", type=Path, help="default: build the demo model")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--short", type=int, default=128)
    parser.add_argument("--long", type=int, default=960)
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = Path(tmp.name) / "demo-tiny"
        load_demo_builder().make_demo_model(model_dir)  # type: ignore[attr-defined]
    servers: list[Server] = []
    sockets = tempfile.TemporaryDirectory()
    sock = str(Path(sockets.name) / "vllm.sock")
    uds = {"vllm": sock}
    loads = [(1, args.short), (1, args.long), (args.streams, args.short)]
    loads.append((args.streams, args.long))
    try:
        print("starting servers ...", file=sys.stderr)
        servers.append(start_ours("transformers", REPO, model_dir, {"ASOBA_DTYPE": "float32"}))
        front = {
            "ASOBA_BACKEND": "vllm",
            "ASOBA_VLLM_PYTHON": args.vllm_python,
            "ASOBA_DTYPE": "float32",
            "ASOBA_KV_CACHE_BYTES": str(1 << 30),
            "ASOBA_MAX_MODEL_LEN": "2048",
            "ASOBA_VLLM_SOCKET": sock,
        }
        ours = start_ours("front+vllm", REPO, model_dir, front)
        servers.append(ours)
        servers.append(Server("vllm", "http://vllm", ours.proc))  # its child, directly
        for s in servers:  # warm every path once
            asyncio.run(one_load(s.base, 2, 16, uds.get(s.name)))
        tps: dict[tuple[str, int, int], list[float]] = {}
        ttft: dict[tuple[str, int, int], list[float]] = {}
        for _ in range(args.runs):
            for streams, tokens in loads:
                for s in servers:
                    rate, first = asyncio.run(one_load(s.base, streams, tokens, uds.get(s.name)))
                    tps.setdefault((s.name, streams, tokens), []).append(rate)
                    ttft.setdefault((s.name, streams, tokens), []).append(first)
    finally:
        for s in servers:
            s.stop()
        sockets.cleanup()
        if tmp is not None:
            tmp.cleanup()

    rows: list[tuple[str, str, str]] = []
    for streams, tokens in loads:
        direct = tps[("vllm", streams, tokens)]
        for s in servers:
            key = (s.name, streams, tokens)
            ratio = "1.00x (itself)"
            if s.name != "vllm":
                ratios = [a / b for a, b in zip(tps[key], direct, strict=True)]
                ratio = f"{statistics.median(ratios):.2f}x ({spread(ratios)}) of vllm"
            rows.append(
                (
                    f"{s.name}, {streams} x {tokens}",
                    f"{statistics.median(tps[key]):.0f} tok/s, "
                    f"TTFT {statistics.median(ttft[key]) * 1000:.0f} ms",
                    ratio,
                )
            )
    header = (
        f"model={model_dir.name} streams={args.streams} short={args.short} long={args.long} "
        f"runs={args.runs} python={platform.python_version()} cpus={os.cpu_count()} "
        f"served as {MODEL!r}"
    )
    print_table(header, ("measurement", "result", "ratio"), rows, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
