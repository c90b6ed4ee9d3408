"""Fixtures for the inference server tests.

``demo_model_dir`` builds the demo checkpoint once per session with scripts/make_demo_model.py;
``live_server`` runs ``python -m remote_service`` on it (CPU, a free loopback port) and waits on
``/health``; ``start_server`` starts more of them for tests that stop or break one.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.support import (
    API_KEY,
    MODEL_NAME,
    REPO,
    ServerProcess,
    StartServer,
    free_port,
    load_script,
    server_env,
)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = load_script("make_demo_model")
    out = tmp_path_factory.mktemp("models") / MODEL_NAME
    script.make_demo_model(out)  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="session")
def start_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StartServer]:
    started: list[ServerProcess] = []

    def start(
        env: dict[str, str], *, wait: bool = True, api_key: str | None = None
    ) -> ServerProcess:
        port = free_port()
        log_path = tmp_path_factory.mktemp("server-log") / "server.log"
        full = {"ASOBA_HOST": "127.0.0.1", "ASOBA_PORT": str(port), **env}
        if api_key:
            full["ASOBA_API_KEY"] = api_key
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "remote_service"],
                cwd=REPO,
                env=server_env(full),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        server = ServerProcess(proc=proc, port=port, log_path=log_path, api_key=api_key)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop(timeout=15)


@pytest.fixture(scope="session")
def live_server(demo_model_dir: Path, start_server: StartServer) -> ServerProcess:
    """The demo model served on CPU, API key required, a small max_tokens cap."""
    return start_server(
        {
            "ASOBA_MODEL_DIR": str(demo_model_dir),
            "ASOBA_MODEL_NAME": MODEL_NAME,
            "ASOBA_MAX_NUM_SEQS": "16",
            "ASOBA_MAX_QUEUE": "64",
            "ASOBA_MAX_NEW_TOKENS": "256",
            "ASOBA_DEFAULT_MAX_TOKENS": "32",
            "ASOBA_API_DOCS": "true",  # the fuzz tests read /openapi.json
        },
        api_key=API_KEY,
    )


@pytest.fixture
def client(live_server: ServerProcess) -> Iterator[httpx.Client]:
    with live_server.client() as c:
        yield c
