"""Wait, on the GPU host, until the inference service is ready and serving the expected model.

Stdlib only: runs with the host's ``python3``. Prints JSON lines (``{"event": "waiting", ...}``
every few seconds, then ``ready`` or ``timeout``) and exits 0 only when ``/health`` says ok and
``/status`` names the expected model on the expected port. Exit 3 means the unit stopped
trying (it failed and systemd gave up), so waiting longer is pointless.

    python3 - PORT MODEL TIMEOUT_S UNIT [MAX_RESTARTS]

A service that crashed during start-up (systemd restarted it MAX_RESTARTS times, default 1)
is reported at once as a crash loop rather than waited on until the timeout.
"""

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def fetch(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (loopback URL)
            return response.status, json.loads(response.read().decode() or "{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read().decode() or "{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def unit_state(unit: str) -> tuple[str, int]:
    """("active/running", restarts) for ``unit``."""
    try:
        out = subprocess.run(
            ["systemctl", "show", unit, "--property=ActiveState,SubState,NRestarts"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", 0
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    restarts = int(props.get("NRestarts") or 0)
    return f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}", restarts


def engine_reason(health: dict[str, Any]) -> str:
    """The engine's own last words from a ``/health`` error answer, on one bounded line: the
    last line of its detail that states an error ("ValueError: ...", "Value error, ..."),
    else the detail's last line."""
    detail = str(health.get("detail") or health.get("error") or "the engine failed")
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    stated = [line for line in lines if re.search(r"(Error|Exception|error)[:,] ", line)]
    line = (stated or lines or ["the engine failed"])[-1]
    return line if len(line) <= 300 else line[:300] + "..."


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> int:
    port, model, timeout, unit = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    max_restarts = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    last_report = 0.0
    while True:
        elapsed = time.monotonic() - started
        health_code, health = fetch(base + "/health")
        if health_code == 200 and health.get("status") == "ok":
            status_code, status = fetch(base + "/status")
            if status_code == 200 and status.get("model") == model and status.get("port") == port:
                emit("ready", elapsed_s=round(elapsed, 1), status=status)
                return 0
            if status_code == 200 and status.get("model") not in (None, model):
                emit("wrong-model", serving=status.get("model"), expected=model)
                return 4
        if health.get("status") == "error":
            emit(
                "failed",
                unit_state="engine error",
                reason=engine_reason(health),
                elapsed_s=round(elapsed, 1),
            )
            return 3
        state, restarts = unit_state(unit)
        if state.startswith("failed") or restarts >= max_restarts:
            emit("failed", unit_state=state, restarts=restarts, elapsed_s=round(elapsed, 1))
            return 3
        if elapsed >= timeout:
            emit(
                "timeout",
                unit_state=state,
                health=health.get("status"),
                elapsed_s=round(elapsed, 1),
            )
            return 2
        if elapsed - last_report >= 5:
            emit(
                "waiting",
                unit_state=state,
                health=health.get("status") or health_code,
                elapsed_s=round(elapsed, 1),
            )
            last_report = elapsed
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
