"""``python -m remote_service`` as systemd runs it: startup errors, request log, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.server.support import REPO, StartServer, server_env


def run_main(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "remote_service"],
        cwd=REPO,
        env=server_env({"ASOBA_PORT": "1", **env}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quantization_on_cpu_fails_at_startup_with_one_clear_line(demo_model_dir: Path) -> None:
    for quant in ("bnb-4bit", "bnb-8bit", "awq"):
        proc = run_main({"ASOBA_MODEL_DIR": str(demo_model_dir), "ASOBA_QUANTIZATION": quant})
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert proc.stderr.strip().splitlines() == [
            f"error: ASOBA_QUANTIZATION={quant} needs a CUDA GPU, but the device is cpu "
            "(ASOBA_DEVICE=auto); use ASOBA_QUANTIZATION=none on this host"
        ]


def test_invalid_settings_fail_with_one_line_each() -> None:
    proc = run_main({"ASOBA_PORT": "http", "ASOBA_DTYPE": "int3"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith("error: ASOBA_PORT:") for line in lines)
    assert any(line.startswith("error: ASOBA_DTYPE:") for line in lines)
    assert "Traceback" not in proc.stderr


def test_missing_model_dir_fails_clearly(tmp_path: Path) -> None:
    proc = run_main({"ASOBA_MODEL_DIR": str(tmp_path / "nothing")})
    assert proc.returncode == 2
    assert "has no config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_one_log_line_per_request_with_timing(start_server: StartServer) -> None:
    server = start_server({"ASOBA_BACKEND": "mock", "ASOBA_MOCK_TOKEN_DELAY": "0"})
    with server.client() as c:
        assert c.post("/generate", json={"prompt": "a b", "max_tokens": 3}).status_code == 200
        assert c.post("/generate", json={"prompt": ""}).status_code == 400
    time.sleep(0.2)
    lines = [line for line in server.log().splitlines() if "POST /generate" in line]
    assert len(lines) == 2
    ok, bad = lines
    assert " 200 " in ok and "ms " in ok and "completion_tokens=3" in ok and "prompt_tokens=2" in ok
    assert " 400 " in bad


def test_sigterm_finishes_short_requests_and_cuts_long_ones(start_server: StartServer) -> None:
    server = start_server(
        {
            "ASOBA_BACKEND": "mock",
            "ASOBA_MOCK_TOKEN_DELAY": "0.02",
            "ASOBA_MAX_NEW_TOKENS": "5000",
            "ASOBA_SHUTDOWN_TIMEOUT": "2",
        }
    )
    results: dict[str, object] = {}

    def short() -> None:  # ~1 s of work: fits in the grace period
        with server.client() as c:
            r = c.post("/generate", json={"prompt": "a b", "max_tokens": 50})
            results["short"] = r.status_code

    def long() -> None:  # ~100 s of work: cut at the end of the grace period
        body = b""
        try:
            with server.client() as c:
                payload = {"prompt": "a b", "max_tokens": 5000, "stream": True}
                with c.stream("POST", "/v1/completions", json=payload) as r:
                    for chunk in r.iter_bytes():
                        body += chunk
        except httpx.HTTPError as exc:
            results["long_error"] = type(exc).__name__
        results["long_done"] = body.endswith(b"data: [DONE]\n\n")
        results["long_body"] = body

    threads = [threading.Thread(target=short), threading.Thread(target=long)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    took = time.monotonic() - started
    for t in threads:
        t.join(timeout=10)
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert took < 10, took  # 2 s grace + engine stop, with a generous margin
    assert results["short"] == 200
    assert results["long_done"] is True  # the stream was ended cleanly ...
    assert b"server shutting down" in results["long_body"]  # ... with an error event
    log = server.log()
    assert "draining for up to 2s" in log and "Shutting down" in log
    assert "Traceback" not in log
