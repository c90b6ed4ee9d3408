#!/usr/bin/env python3
"""How long running streams stall while a long prompt joins, timed inside the engine.

``--stall-streams`` streams generate; then a ``--stall-prompt``-token prompt joins. The engine's
own observer timestamps every token on the worker thread, so HTTP and the client (which share
the host's cores) do not blur the gaps: the figure is the longest gap between two tokens of a
running stream that overlaps the joiner's wait for its first token, against their median gap
before it arrived.

Each checkout (``--checkout DIR``, repeatable; default: this one) runs in its own process with
that checkout's ``remote_service`` on ``sys.path``; rounds alternate between them.

    python scripts/bench_engine_stall.py --model-dir /tmp/demo-tiny \\
        --checkout /tmp/engine-before --checkout . --chunks 512,128 --runs 5 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import load_demo_builder, print_table


class GapRecorder:
    """An engine observer: (time, seconds since the stream's previous token) per token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gaps: list[tuple[float, float]] = []

    def first_token(self, ttft_s: float) -> None:
        pass

    def inter_token(self, seconds: float) -> None:
        with self._lock:
            self.gaps.append((time.perf_counter(), seconds))

    def finished(self, *_: object) -> None:
        pass


def measure(
    model_dir: Path, streams: int, prompt_tokens: int, chunk: int | None
) -> dict[str, float]:
    """One round in this process: the stall of ``streams`` streams as the long prompt joins."""
    from remote_service.engine import GenerationRequest, SamplingParams
    from remote_service.engine.transformers_engine import TransformersEngine
    from remote_service.settings import Settings

    fields: dict[str, object] = {"model_dir": model_dir, "max_num_seqs": streams + 1}
    fields |= {"warmup": False} | ({"prefill_chunk": chunk} if chunk else {})
    recorder = GapRecorder()
    engine = TransformersEngine(Settings.model_validate(fields), recorder)
    engine.load()
    corpus = load_demo_builder().CORPUS  # type: ignore[attr-defined]
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += engine.encode(corpus, add_special_tokens=False)
    long_ids = ids[:prompt_tokens]
    short = engine.encode("The inference service loads safetensors shards from disk")
    run = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)

    async def go() -> tuple[float, float]:
        held = [await engine.stream(GenerationRequest(f"r{i}", short, run)) for i in range(streams)]
        readers = [asyncio.ensure_future(_drain(d)) for d in held]
        await asyncio.sleep(1.0)  # all of them generating
        arrived = time.perf_counter()
        deltas = await engine.stream(
            GenerationRequest("long", long_ids, SamplingParams(max_tokens=4, temperature=0.0))
        )
        async for _ in deltas:
            break
        joined = time.perf_counter()
        await asyncio.sleep(0.3)
        for d in held:
            d.close()
        deltas.close()
        await asyncio.gather(*readers, return_exceptions=True)
        return arrived, joined

    arrived, joined = asyncio.run(go())
    engine.shutdown(1)
    before = [g for t, g in recorder.gaps if t < arrived]
    during = [g for t, g in recorder.gaps if t > arrived and t - g < joined]
    return {
        "worst_ms": 1000 * max(during, default=0.0),
        "usual_ms": 1000 * statistics.median(before),
        "ttft_ms": 1000 * (joined - arrived),
    }


async def _drain(deltas: object) -> None:
    async for _ in deltas:  # type: ignore[attr-defined]
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--checkout", type=Path, action="append", help="repeatable")
    parser.add_argument("--chunks", default="", help="ASOBA_PREFILL_CHUNK values to try")
    parser.add_argument("--stall-streams", type=int, default=8)
    parser.add_argument("--stall-prompt", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="compute threads")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one round, JSON out
    args = parser.parse_args(argv)
    if args.one is not None:
        import torch

        torch.set_num_threads(args.threads)
        chunk = int(args.one) or None
        one = measure(args.model_dir, args.stall_streams, args.stall_prompt, chunk)
        print(json.dumps(one))
        return 0

    here = Path(__file__).resolve().parents[1]
    checkouts = [c.resolve() for c in (args.checkout or [here])]
    chunks = [int(c) for c in args.chunks.split(",") if c]
    variants: list[tuple[str, Path, int]] = []
    for c in checkouts:
        label = "after" if c == here else c.name
        supports = (c / "remote_service" / "engine" / "slot_cache.py").exists()
        if supports and chunks:
            variants += [(f"{label} (chunk {k})", c, k) for k in chunks]
        else:
            variants.append((label, c, 0))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    for r in range(args.runs):
        for name, checkout, chunk in variants:
            print(f"round {r + 1}: {name}", file=sys.stderr)
            env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(chunk), *_passthrough(args)],
                cwd=checkout,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    rows: list[tuple[str, str, str]] = []
    for name, got in results.items():
        worst = [x["worst_ms"] for x in got]
        usual = statistics.median(x["usual_ms"] for x in got)
        ttft = statistics.median(x["ttft_ms"] for x in got)
        rows.append(
            (
                f"{name}: longest gap while a {args.stall_prompt}-token prompt joins "
                f"{args.stall_streams} streams",
                f"{statistics.median(worst):.0f} ms ({min(worst):.0f}-{max(worst):.0f}); usual "
                f"gap {usual:.1f} ms",
                f"joiner TTFT {ttft:.0f} ms",
            )
        )
    header = f"stall, in-process, runs={args.runs} threads={args.threads} cpus={os.cpu_count()}"
    print_table(header, ("measurement", "result", "ratio"), rows, markdown=args.markdown)
    return 0


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--model-dir",
        str(args.model_dir.resolve()),
        "--stall-streams",
        str(args.stall_streams),
        "--stall-prompt",
        str(args.stall_prompt),
        "--threads",
        str(args.threads),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
