"""``python -m remote_service``: run the server with settings from ``ASOBA_*`` variables.

Exit status 2 means the settings cannot work on this host (the reason is printed as one line,
no traceback): systemd should not restart on it (``RestartPreventExitStatus=2``). Logs go to
stdout, so the journal collects them. SIGTERM drains open requests for up to
``ASOBA_SHUTDOWN_TIMEOUT`` seconds, then cancels what is left and exits.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

EXIT_CONFIG = 2
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
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

    import uvicorn

    from remote_service.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
