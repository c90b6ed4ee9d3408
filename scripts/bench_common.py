"""What the server benchmarks share: percentiles, the demo model, a server subprocess.

Imported by scripts/bench_server.py and scripts/bench_load.py (and, through them, by tests).
"""

from __future__ import annotations

import importlib.util
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


def start_server(
    model_dir: Path, port: int, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m remote_service`` on loopback, returned once /health answers 200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASOBA_")}
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
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


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
