"""Inspect the GPU host: one remote command over the executor's one connection.

The command is the stdlib script ``deployer/remote/probe_host.py``, sent on stdin to the host's
own ``python3 -``; it prints one JSON object, validated here into ``HostFacts``. Nothing on the host
is changed: the script only reads /proc, /sys, the state file, and asks systemctl and the GPU
driver.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from pydantic import ValidationError

from .config import RemoteConfig
from .errors import CommandResult, ProbeError
from .facts import HostFacts
from .operator_input import describe
from .releases import current_path
from .ssh import Executor

PROBE_SCRIPT = Path(__file__).resolve().parent / "remote" / "probe_host.py"
#: Each command inside the probe gets this long; the whole remote command a little more.
COMMAND_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 30.0


@cache
def probe_script() -> str:
    return PROBE_SCRIPT.read_text(encoding="utf-8")


def probe_command(remote: RemoteConfig, *, command_timeout: float = COMMAND_TIMEOUT_S) -> list[str]:
    """The one remote command, ``python3 - --models-dir ...``; the script goes on stdin."""
    return [
        remote.python,
        "-",
        "--models-dir",
        remote.models_dir,
        "--state-file",
        current_path(remote.state_dir),
        "--flux-unit",
        remote.flux_service,
        "--inference-unit",
        remote.service_name,
        "--timeout",
        f"{command_timeout:g}",
    ]


def parse_probe_output(result: CommandResult, *, python: str = "python3") -> HostFacts:
    """Validate what the probe printed; every way it can be wrong is a ``ProbeError``."""
    if result.exit_code == 127:
        raise ProbeError(
            f"host probe: {python} not found on the host",
            hint="set remote.python to the host's Python 3 interpreter",
        )
    if result.exit_code == 124:
        raise ProbeError(f"host probe timed out: {result.stderr_tail(1)}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        tail = result.stderr_tail(3).replace("\n", " | ")
        raise ProbeError(
            f"host probe printed nothing (exit {result.exit_code})" + (f": {tail}" if tail else "")
        )
    try:
        data = json.loads(lines[-1])
    except ValueError:
        raise ProbeError(
            f"host probe printed something that is not JSON: {lines[-1][:120]!r}"
        ) from None
    if not isinstance(data, dict):
        raise ProbeError("host probe printed JSON that is not an object")
    if "fatal" in data:
        raise ProbeError(f"host probe failed on the host: {data['fatal']}")
    try:
        return HostFacts.model_validate(data)
    except ValidationError as exc:
        raise ProbeError(f"host probe answered unexpected data: {describe(exc)}") from None


def inspect_host(
    executor: Executor,
    remote: RemoteConfig,
    *,
    timeout: float = PROBE_TIMEOUT_S,
    command_timeout: float = COMMAND_TIMEOUT_S,
) -> HostFacts:
    """Measure the host through ``executor`` (one command). Raises ``ProbeError``; connection
    failures come from the executor as ``ConnectError``."""
    result = executor.run(
        probe_command(remote, command_timeout=command_timeout),
        stdin=probe_script(),
        check=False,
        timeout=timeout,
        what="host probe",
    )
    return parse_probe_output(result, python=remote.python)
