"""``python -m remote_service``: run the server with settings from ``ASOBA_*`` variables.

Exit status 2 means the settings cannot work on this host (the reason is printed as one line,
no traceback): systemd should not restart on it (``RestartPreventExitStatus=2``). Logs go to
stdout, so the journal collects them. SIGTERM drains open requests for up to
``ASOBA_SHUTDOWN_TIMEOUT`` seconds, then aborts what is left and exits; uvicorn re-raises the
signal after its clean shutdown, so the exit reads as "killed by SIGTERM", which systemd
counts as a clean stop.

Exit status 3 means the engine died and cannot recover in-process (the vLLM child server
exited, or was not ready in time): the server keeps answering ``/health`` (503 with the reason)
for a few seconds, then exits, and systemd's ``Restart=`` starts it again.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import FrameType

import uvicorn

from remote_service.connections import protocol_class
from remote_service.engine.base import Engine
from remote_service.log_filters import RateLimitFilter

EXIT_CONFIG = 2
EXIT_ENGINE_DIED = 3
FATAL_EXIT_DELAY_S = 3.0  # /health reports why before the process goes
_UVICORN_EXTRA_GRACE_S = 5
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access log replaces it


def _fail(lines: Sequence[str]) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def main(environ: Mapping[str, str] | None = None) -> int:
    from remote_service.settings import Settings, SettingsError, unknown_env_vars

    env = os.environ if environ is None else environ
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        return _fail(exc.problems)
    configure_logging(settings.log_level)
    log = logging.getLogger("remote_service")
    for name in unknown_env_vars(env):
        log.warning("ignoring unknown setting %s", name)

    if settings.backend == "transformers":
        from remote_service.engine.base import EngineLoadError
        from remote_service.engine.loading import plan_load

        try:
            plan = plan_load(settings)
        except EngineLoadError as exc:
            return _fail([str(exc)])
        log.info(
            "load plan: device=%s dtype=%s quantization=%s",
            plan.device,
            plan.dtype,
            plan.quantization,
        )

    if settings.backend == "vllm":
        from remote_service.engine.base import EngineLoadError
        from remote_service.engine.vllm_child import plan_vllm

        try:
            plan_vllm(settings, env, make_socket=False)
        except EngineLoadError as exc:
            return _fail([str(exc)])

    from remote_service.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # A backstop only: the engine ends open requests cleanly before this runs out.
        timeout_graceful_shutdown=round(settings.shutdown_timeout) + _UVICORN_EXTRA_GRACE_S,
        lifespan="on",
        # Read deadlines and the connection cap (remote_service/connections.py).
        http=protocol_class(
            request_timeout=settings.request_timeout, max_connections=settings.max_connections
        ),
        # A request line plus headers larger than this is refused by h11 (400).
        h11_max_incomplete_event_size=64 * 1024,
    )
    server = DrainingServer(config, engine=app.state.engine, grace=settings.shutdown_timeout)
    server.run()
    if server.exit_status is not None:
        return server.exit_status
    return 0 if server.started else 1


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, also tell the engine to drain: running sequences get ``grace``
    seconds to finish, then are aborted, so open streams end with an error event and
    ``[DONE]`` instead of a cut connection, and uvicorn's own wait ends early."""

    def __init__(self, config: uvicorn.Config, *, engine: Engine, grace: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._grace = grace
        self._draining = False
        self._fatal_since: float | None = None
        self.exit_status: int | None = None

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        reason = self._engine.fatal()
        if reason is None or self._draining:
            return False
        now = time.monotonic()
        if self._fatal_since is None:
            self._fatal_since = now
        elif now - self._fatal_since >= FATAL_EXIT_DELAY_S:
            logging.getLogger("remote_service").error(
                "the engine failed (%s): exiting with status %d so that systemd restarts it",
                reason.splitlines()[0],
                EXIT_ENGINE_DIED,
            )
            self.exit_status = EXIT_ENGINE_DIED
            return True
        return False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._draining:
            self._draining = True
            logging.getLogger("remote_service").info(
                "signal %d: draining for up to %.0fs", sig, self._grace
            )
            threading.Thread(
                target=self._engine.shutdown, args=(self._grace,), name="drain", daemon=True
            ).start()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    raise SystemExit(main())
