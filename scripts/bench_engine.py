#!/usr/bin/env python3
"""Benchmark the transformers engine's cost per token, side by side, in one run.

Servers on the same checkpoint, measured in turns (each round visits every server, so a busy
neighbour slows all alike):

- ``after``: this checkout's server;
- ``before`` (``--before DIR``): the server of another checkout, e.g. the base commit
  (``git worktree add /tmp/engine-before BASE``);
- ``vllm`` (``--vllm-python PY``): vLLM's OpenAI server from another environment.

Measures:

1. length scaling: aggregate tok/s of ``--streams`` x ``--short`` and x ``--long`` tokens, and
   their ratio, per server (the ratio is taken within each round);
2. the engine against vLLM at ``--streams`` x ``--long``;
3. single stream: in-process ``model.generate()`` against one stream through each server;
4. stall: while ``--stall-streams`` streams generate, a ``--stall-prompt``-token prompt joins;
   the longest gap between two tokens of the running streams from its arrival to its first
   token, against their median gap before it arrived.

Read ratios, not absolute tokens/s: on a tiny model on CPU they measure per-token bookkeeping.

    python scripts/bench_engine.py --before /tmp/engine-before \\
        --vllm-python /tmp/vllm-venv/bin/python --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    REPO,
    free_port,
    load_demo_builder,
    print_table,
    start_server,
    stream_completion,
    wait_ready,
)
from bench_server import PROMPT, Baseline

MODEL = "bench"
#: Compute threads per server. One by default: on a small shared host, several OpenMP threads
#: per process spin against each other and against the neighbours, and timings scatter by 10x.
THREADS = 1


@dataclass
class Server:
    name: str
    base: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_ours(name: str, checkout: Path, model_dir: Path, env_extra: dict[str, str]) -> Server:
    port = free_port()
    env = {"OMP_NUM_THREADS": str(THREADS), "ASOBA_MAX_NUM_SEQS": "16", **env_extra}
    proc = start_server(model_dir, port, env, checkout=checkout, ready_s=180)
    return Server(name, f"http://127.0.0.1:{port}", proc)


def start_vllm(python: str, model_dir: Path, *, eager: bool = False) -> Server:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    # As the service runs it on CPU (remote_service/engine/vllm_child.py): the model in the
    # engine process, its compute threads set by OMP_NUM_THREADS.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["OMP_NUM_THREADS"] = str(THREADS)
    extra = []
    if eager:  # as on a host without a C++ compiler (the sandbox): no inductor at all
        env["TORCHDYNAMO_DISABLE"] = "1"
        extra.append("--enforce-eager")
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            MODEL,
            "--dtype",
            "float32",  # as the transformers engine runs on CPU
            "--max-num-seqs",
            "16",
            "--distributed-executor-backend",
            "uni",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/v1/models", 600, poll_s=0.5)
    return Server("vllm eager" if eager else "vllm", base, proc)


# --- clients ---------------------------------------------------------------------------------


async def stream(
    client: httpx.AsyncClient, prompt: str, tokens: int, stamps: list[float] | None = None
) -> tuple[int, float]:
    """One streamed completion: (completion tokens, seconds to the first token)."""
    used, _, first = await stream_completion(client, prompt, tokens, model=MODEL, stamps=stamps)
    return used, first


async def aggregate(base: str, streams: int, tokens: int) -> float:
    """Aggregate completion tokens/s of ``streams`` simultaneous streams."""
    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(stream(client, PROMPT, tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return sum(n for n, _ in done) / wall


@dataclass
class Stall:
    worst_gap: float  # longest gap of a running stream while the long prompt joined
    usual_gap: float  # median gap of the running streams before it arrived
    joiner_ttft: float


async def stall(base: str, streams: int, long_prompt: str) -> Stall:
    limits = httpx.Limits(max_connections=streams + 3)
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client:
        stamps: list[list[float]] = [[] for _ in range(streams)]
        running = [
            asyncio.ensure_future(stream(client, PROMPT, 1500, stamps[i])) for i in range(streams)
        ]
        while min(len(s) for s in stamps) < 20:  # all of them generating
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        arrived = time.perf_counter()
        _, ttft = await stream(client, long_prompt, 4)
        joined = arrived + ttft
        await asyncio.sleep(0.5)  # the running streams' events of the window are all read
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    worst, usual = 0.0, []
    for s in stamps:
        gaps = list(itertools.pairwise(s))
        usual += [b - a for a, b in gaps if b < arrived]
        # every gap that overlaps the joiner's prefill, from its arrival to its first token
        worst = max([worst] + [b - a for a, b in gaps if b > arrived and a < joined])
    return Stall(worst, statistics.median(usual), ttft)


def long_prompt_text(model_dir: Path, tokens: int) -> tuple[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    corpus = load_demo_builder().CORPUS  # type: ignore[attr-defined]
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tok(corpus, add_special_tokens=False)["input_ids"]
    text = str(tok.decode(ids[:tokens]))
    return text, len(tok(text, add_special_tokens=False)["input_ids"])


# --- the run ---------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def main(argv: list[str] | None = None) -> int:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="checkpoint (default: build demo-tiny)")
    parser.add_argument("--before", type=Path, help="a checkout whose server is 'before'")
    parser.add_argument("--vllm-python", help="python of an environment with vllm installed")
    parser.add_argument(
        "--vllm-eager", action="store_true", help="also vLLM with --enforce-eager, as 'vllm eager'"
    )
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--short", type=int, default=128, help="tokens per stream, short run")
    parser.add_argument("--long", type=int, default=960, help="tokens per stream, long run")
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--stall-streams", type=int, default=8)
    parser.add_argument("--stall-prompt", type=int, default=1500, help="tokens of the joiner")
    parser.add_argument(
        "--chunks",
        default="",
        help="comma list of ASOBA_PREFILL_CHUNK values: one 'after' server each (default: 1)",
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds over all servers")
    parser.add_argument("--skip", default="", help="comma list of: scaling,single,stall")
    parser.add_argument("--threads", type=int, default=THREADS, help="compute threads per server")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    THREADS = args.threads
    skip = set(filter(None, args.skip.split(",")))

    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-")
        model_dir = Path(tmp.name) / "demo-tiny"
        load_demo_builder().make_demo_model(model_dir)  # type: ignore[attr-defined]

    servers: list[Server] = []
    try:
        print("starting servers ...", file=sys.stderr)
        if args.before:
            servers.append(start_ours("before", args.before.resolve(), model_dir, {}))
        chunks = [c for c in args.chunks.split(",") if c]
        if not chunks:
            servers.append(start_ours("after", REPO, model_dir, {}))
        for c in chunks:
            env = {"ASOBA_PREFILL_CHUNK": c}
            servers.append(start_ours(f"after (chunk {c})", REPO, model_dir, env))
        if args.vllm_python:
            servers.append(start_vllm(args.vllm_python, model_dir))
            if args.vllm_eager:
                servers.append(start_vllm(args.vllm_python, model_dir, eager=True))
        for s in servers:  # warm every path once
            asyncio.run(aggregate(s.base, 2, 16))
        rows = run_all(args, skip, servers, model_dir)
    finally:
        for s in servers:
            s.stop()
        if tmp is not None:
            tmp.cleanup()
    header = (
        f"model={model_dir.name} streams={args.streams} short={args.short} long={args.long} "
        f"runs={args.runs} python={platform.python_version()} cpus={os.cpu_count()}"
    )
    print_table(header, ("measurement", "result", "ratio"), rows, markdown=args.markdown)
    return 0


def run_all(
    args: argparse.Namespace, skip: set[str], servers: list[Server], model_dir: Path
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    names = [s.name for s in servers]
    n = args.streams
    if "scaling" not in skip:
        short: dict[str, list[float]] = {k: [] for k in names}
        long: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.runs):
            for s in servers:
                print(f"round {r + 1}: {s.name} scaling", file=sys.stderr)
                short[s.name].append(asyncio.run(aggregate(s.base, n, args.short)))
                long[s.name].append(asyncio.run(aggregate(s.base, n, args.long)))
        for k in names:
            ratios = [b / a for a, b in zip(short[k], long[k], strict=True)]
            rows.append(
                (
                    f"{k}: {n} x {args.short} / {n} x {args.long} aggregate",
                    f"{statistics.median(short[k]):.0f} / {statistics.median(long[k]):.0f} tok/s",
                    f"{n}x{args.long} at {statistics.median(ratios):.2f}x "
                    f"({spread(ratios)}) of {n}x{args.short}",
                )
            )
        for v in (x for x in names if x.startswith("vllm")):
            for k in (x for x in names if not x.startswith("vllm")):
                ratios = [a / b for a, b in zip(long[k], long[v], strict=True)]
                rows.append(
                    (
                        f"{k} against {v}, {n} x {args.long}",
                        f"{statistics.median(long[k]):.0f} vs "
                        f"{statistics.median(long[v]):.0f} tok/s",
                        f"{statistics.median(ratios):.2f}x ({spread(ratios)}) of {v}",
                    )
                )
    ours = [s for s in servers if not s.name.startswith("vllm")]
    if "single" not in skip:
        import torch

        torch.set_num_threads(THREADS)  # the in-process baseline, like the servers
        baseline = Baseline(model_dir, args.single_tokens)
        gen: list[float] = []
        single: dict[str, list[float]] = {s.name: [] for s in ours}
        for _ in range(args.runs * 2):
            gen.append(baseline.run())
            for s in ours:
                single[s.name].append(asyncio.run(aggregate(s.base, 1, args.single_tokens)))
        g = statistics.median(gen)
        rows.append(("single stream, model.generate() in-process", f"{g:.0f} tok/s", "1.00x"))
        for k, runs in single.items():
            rows.append(
                (
                    f"{k}: single stream through the server",
                    f"{statistics.median(runs):.0f} tok/s",
                    f"{statistics.median(runs) / g:.2f}x of generate()",
                )
            )
    if "stall" not in skip:
        text, count = long_prompt_text(model_dir, args.stall_prompt)
        stalls: dict[str, list[Stall]] = {s.name: [] for s in servers}
        for r in range(args.runs):
            for s in servers:
                print(f"round {r + 1}: {s.name} stall", file=sys.stderr)
                stalls[s.name].append(asyncio.run(stall(s.base, args.stall_streams, text)))
        ms = 1000.0
        for k, got in stalls.items():
            worst = [x.worst_gap * ms for x in got]
            usual = [x.usual_gap * ms for x in got]
            ttft = [x.joiner_ttft * ms for x in got]
            rows.append(
                (
                    f"{k}: longest gap while a {count}-token prompt joins "
                    f"{args.stall_streams} streams",
                    f"{statistics.median(worst):.0f} ms ({spread(worst, '{:.0f}')}); "
                    f"usual gap {statistics.median(usual):.1f} ms",
                    f"joiner TTFT {statistics.median(ttft):.0f} ms ({spread(ttft, '{:.0f}')})",
                )
            )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
