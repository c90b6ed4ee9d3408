#!/usr/bin/python3
"""Stand-in for the resident Flux image API on the sandbox host. Not Flux.

The GPU hosts we deploy to already run `flux-api.service` on port 8000. On the sandbox host
this small stdlib server plays that part: the deployer sees a unit it must leave alone (or
stop, when it takes port 8000), a port that is taken, and resident memory in use. It holds
FLUX_RAM_MB of RAM (pages touched, so they count as resident) and answers:

    GET /health   200 {"status": "ok", "service": "flux-api", "standin": true, ...}
    GET /         same body

Its GPU memory share is not held here but reported by the nvidia-smi test double while this
unit is active. Settings come from /etc/flux-api/flux.env (FLUX_HOST, FLUX_PORT, FLUX_RAM_MB).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAGE = 4096


def hold_ram(megabytes: int) -> bytearray:
    block = bytearray(megabytes * 1024 * 1024)
    for offset in range(0, len(block), PAGE):
        block[offset] = 1
    return block


class Handler(BaseHTTPRequestHandler):
    server_version = "flux-api-standin/1"
    started = time.time()
    ram_mb = 0

    def do_GET(self) -> None:
        if self.path not in {"/", "/health"}:
            self._send(404, {"detail": "not found"})
            return
        self._send(
            200,
            {
                "status": "ok",
                "service": "flux-api",
                "standin": True,
                "pid": os.getpid(),
                "ram_mb": self.ram_mb,
                "uptime_s": round(time.time() - self.started, 1),
            },
        )

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {format % args}\n")
        sys.stdout.flush()


def main() -> int:
    host = os.environ.get("FLUX_HOST", "0.0.0.0")
    port = int(os.environ.get("FLUX_PORT", "8000"))
    Handler.ram_mb = int(os.environ.get("FLUX_RAM_MB", "256"))
    ballast = hold_ram(Handler.ram_mb)
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True

    def stop(signum: int, _frame: object) -> None:
        print(f"flux-api stand-in: signal {signum}, stopping", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"flux-api stand-in on {host}:{port}, holding {Handler.ram_mb} MB", flush=True)
    server.serve_forever()
    server.server_close()
    del ballast
    return 0


if __name__ == "__main__":
    sys.exit(main())
