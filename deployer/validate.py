"""Pre-flight checks (``validate-components``): does the whole chain work, before any deploy?

Each check answers ``pass``, ``warn`` or ``fail`` with the value it measured and, when not
``pass``, a one-line remedy. Checks are grouped; ``--only`` picks groups::

    config     the config file, the SSH key file (exists, mode 0600-ish), the catalog
    ssh        reachable, host key known and matching, key auth, connect and round-trip time
    sudo       passwordless sudo: runs `sudo -n true`, `sudo -n systemctl --version`,
               `sudo -n install --version`, and asks `sudo -n -l` about the rest
    resources  RAM, disk under remote.models_dir, GPUs, the Flux and inference units
    systemd    unit state readable, daemon-reload permitted (sudo -l, never run), journal
    python     the host's python3: version, venv + ensurepip, room for a venv; torch and CUDA
    s3         operator credentials, bucket, every selected model's prefix; the host's own
               credentials and whether S3 answers from the host (the host does the pull)
    health     when deployed: /health and /status answer in the monitor's format (loopback)

Every check is read-only and independent: one failing does not hide the others. A check that
cannot run because what it stands on failed (no config, no SSH session) is reported as a
``fail`` saying so. All host checks share one SSH connection and two remote commands: ``true``
(the round trip) and ``deployer/remote/validate_host.py``, which runs the host probe and every
host-side command at once.

Missing model prefixes are a warning when the whole catalog is checked (a catalog can name
models not uploaded yet) and a failure when the operator named the models (``--models``);
``--strict`` turns every warning into exit status 1.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import CommandResult, DeployError
from .operator_input import did_you_mean
from .service_code import lock_python

if TYPE_CHECKING:
    from .catalog import Catalog, ModelSpec
    from .config import Settings
    from .facts import HostFacts, UnitFacts
    from .ssh import Executor

Status = Literal["pass", "warn", "fail"]
HostFactory = Callable[["Settings", bool], "Executor"]
S3Factory = Callable[["Settings"], tuple[Any, Any]]  # (boto3 session, s3 client)

GB = 1_000_000_000
HOST_SCRIPT = Path(__file__).resolve().parent / "remote" / "validate_host.py"
COMMAND_TIMEOUT_S = 10.0
HOST_TIMEOUT_S = 60.0
RTT_TIMEOUT_S = 10.0
MIN_PYTHON = (3, 11)  # remote_service's requires-python
VENV_FAIL_GB = 2.0
VENV_WARN_GB = 5.0
S3_WORKERS = 8

GROUPS: tuple[str, ...] = (
    "config",
    "ssh",
    "sudo",
    "resources",
    "systemd",
    "python",
    "s3",
    "health",
)
#: Every row each group reports, in order (for rows that could not run).
ROWS: dict[str, tuple[str, ...]] = {
    "config": ("config", "config.key_file", "config.catalog"),
    "ssh": ("ssh",),
    "sudo": ("sudo",),
    "resources": (
        "resources.ram",
        "resources.disk",
        "resources.gpu",
        "resources.flux",
        "resources.inference",
    ),
    "systemd": ("systemd.units", "systemd.reload", "systemd.journal"),
    "python": ("python", "python.torch"),
    "s3": ("s3.credentials", "s3.bucket", "s3.models", "s3.host_credentials", "s3.host_reach"),
    "health": ("health",),
}
OPERATOR_ROWS = frozenset({"s3.credentials", "s3.bucket", "s3.models", *ROWS["config"]})
PROBE_GROUPS = frozenset({"resources", "systemd", "python", "health"})
HOST_GROUPS = frozenset({"ssh", "sudo", "resources", "systemd", "python", "s3", "health"})

#: Run with ``sudo -n``: harmless commands whose success proves passwordless sudo works.
SUDO_RUN: tuple[tuple[str, ...], ...] = (
    ("true",),
    ("systemctl", "--version"),
    ("install", "--version"),
)


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class CheckResult:
    """One row of the report."""

    name: str
    status: Status
    value: str
    remedy: str | None = None
    duration_s: float = 0.0

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "value": self.value,
            "remedy": self.remedy,
            "duration_s": round(self.duration_s, 3),
        }


def ok(name: str, value: str, duration_s: float = 0.0) -> CheckResult:
    return CheckResult(name, "pass", value, None, duration_s)


def warn(name: str, value: str, remedy: str, duration_s: float = 0.0) -> CheckResult:
    return CheckResult(name, "warn", value, remedy, duration_s)


def fail(name: str, value: str, remedy: str, duration_s: float = 0.0) -> CheckResult:
    return CheckResult(name, "fail", value, remedy, duration_s)


def not_checked(names: Iterable[str], reason: str, remedy: str) -> list[CheckResult]:
    return [fail(name, f"not checked: {reason}", remedy) for name in names]


@dataclass(frozen=True)
class Report:
    results: tuple[CheckResult, ...]
    strict: bool = False
    duration_s: float = 0.0

    def counts(self) -> dict[str, int]:
        counts = {"pass": 0, "warn": 0, "fail": 0}
        for result in self.results:
            counts[result.status] += 1
        return counts

    @property
    def exit_code(self) -> int:
        """0 when everything passed (warnings allowed unless strict), else 1."""
        counts = self.counts()
        return 1 if counts["fail"] or (self.strict and counts["warn"]) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "strict": self.strict,
            "duration_s": round(self.duration_s, 3),
            "counts": self.counts(),
            "checks": [result.to_json() for result in self.results],
        }


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    only: frozenset[str] = frozenset(GROUPS)
    strict: bool = False
    models: tuple[str, ...] | None = None  # None: the whole catalog
    min_disk_gb: float | None = None  # None: from the selected models' sizes
    min_ram_gb: float | None = None  # None: policy.ram_margin_gb
    trust_new_host_key: bool = False
    config_path: str | None = None
    debug: bool = False  # let unexpected exceptions out instead of failing the check


def parse_list(text: str | None) -> tuple[str, ...] | None:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; None or blank -> None."""
    if text is None:
        return None
    items = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    return items or None


def parse_only(text: str | None) -> frozenset[str]:
    """The groups ``--only`` names; ValueError for an unknown one."""
    names = parse_list(text)
    if names is None:
        return frozenset(GROUPS)
    for name in names:
        if name not in GROUPS:
            raise ValueError(
                f"unknown check {name!r}{did_you_mean(name, GROUPS)}; "
                f"choose from {', '.join(GROUPS)}"
            )
    return frozenset(names)


def ordered(results: Iterable[CheckResult]) -> tuple[CheckResult, ...]:
    """Rows in the documented order (groups, then each group's rows)."""
    rank = {name: i for i, name in enumerate(row for rows in ROWS.values() for row in rows)}
    return tuple(sorted(results, key=lambda r: rank.get(r.name, len(rank))))


def guarded(
    names: Sequence[str], work: Callable[[], list[CheckResult]], *, debug: bool
) -> list[CheckResult]:
    """Run ``work``; any error fails the rows ``names`` instead of stopping the others."""
    started = time.monotonic()
    try:
        return work()
    except DeployError as exc:  # an expected failure: a row even with --debug
        remedy = exc.hint or "see the message; rerun with --debug for details"
        return _timed(not_checked(names, _line(str(exc)), remedy), started)
    except Exception as exc:
        if debug:
            raise
        message = f"unexpected {type(exc).__name__}: {_line(str(exc))}"
        return _timed(not_checked(names, message, "rerun with --debug for details"), started)


def _timed(results: list[CheckResult], started: float) -> list[CheckResult]:
    elapsed = time.monotonic() - started
    return [replace(r, duration_s=elapsed) for r in results]


def _line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


# ------------------------------------------------------------------------------ config


@dataclass
class Loaded:
    """What the config stage produced for the other checks."""

    settings: Settings | None = None
    catalog: Catalog | None = None
    specs: list[ModelSpec] = field(default_factory=list)
    results: list[CheckResult] = field(default_factory=list)

    def shown(self, groups: frozenset[str]) -> list[CheckResult]:
        """The config rows to report: the selected ones, and a failure others depend on."""
        needed = {"config"} if self.settings is None else set()
        if self.settings is not None and "s3" in groups:
            needed.add("config.catalog")
        return [
            r
            for r in self.results
            if r.group in groups or (r.name in needed and r.status == "fail")
        ]


def check_settings(
    options: Options, environ: Mapping[str, str]
) -> tuple[CheckResult, Settings | None]:
    from .config import load_settings
    from .errors import ConfigError

    started = time.monotonic()
    try:
        settings = load_settings(options.config_path, environ=environ)
        address = settings.require_host()
    except ConfigError as exc:
        remedy = exc.hint or "fix the config file (--config, $MODEL_DEPLOYER_CONFIG)"
        return fail("config", _line(exc.message), remedy, time.monotonic() - started), None
    host = settings.host
    value = f"{settings.source}: {host.user}@{address}:{host.port}"
    elapsed = time.monotonic() - started
    if settings.source == "defaults":
        remedy = "write a config file (--config or $MODEL_DEPLOYER_CONFIG) to pin the settings"
        return warn("config", f"no config file; {value} from the environment", remedy), settings
    return ok("config", value, elapsed), settings


def check_key_file(path: Path | None, environ: Mapping[str, str]) -> CheckResult:
    """The SSH private key: present, a regular file, readable, no group/other permissions."""
    name = "config.key_file"
    if path is None:
        if environ.get("SSH_AUTH_SOCK"):
            return ok(name, "no host.key_file: keys come from the ssh-agent")
        return fail(
            name, "no host.key_file and no ssh-agent", "set host.key_file to the private key"
        )
    try:
        st = path.stat()
    except FileNotFoundError:
        return fail(name, f"{path}: no such file", "set host.key_file to an existing private key")
    except OSError as exc:
        return fail(name, f"{path}: {exc.strerror}", "check the path and its permissions")
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return fail(name, f"{path}: not a regular file", "set host.key_file to the private key")
    if mode & 0o077:
        return fail(
            name,
            f"{path}: mode {mode:04o}, group/other can access it",
            f"chmod 600 {path}",
        )
    if not os.access(path, os.R_OK):
        return fail(name, f"{path}: not readable by this user", f"chown $USER {path}")
    return ok(name, f"{path} (mode {mode:04o})")


def check_catalog(
    settings: Settings, options: Options
) -> tuple[CheckResult, Catalog | None, list[ModelSpec]]:
    from .catalog import load_catalog
    from .errors import CatalogError

    try:
        catalog = load_catalog(settings.catalog)
    except CatalogError as exc:
        return fail("config.catalog", _line(exc.message), "fix the catalog file"), None, []
    names = options.models or tuple(catalog.models)
    unknown = [n for n in names if n not in catalog.models]
    if unknown:
        hint = did_you_mean(unknown[0], catalog.models)
        value = f"unknown model(s) in --models: {', '.join(unknown)}{hint}"
        return fail("config.catalog", value, "`deploy-model --list` shows the catalog"), None, []
    specs = [catalog.models[n] for n in names]
    scope = "selected" if options.models else "in the catalog"
    value = f"{catalog.source}: {len(specs)} model(s) {scope}, bucket {catalog.bucket}"
    return ok("config.catalog", value), catalog, specs


def load_config(options: Options, environ: Mapping[str, str]) -> Loaded:
    loaded = Loaded()
    result, loaded.settings = check_settings(options, environ)
    loaded.results.append(result)
    if loaded.settings is None:
        loaded.results += not_checked(ROWS["config"][1:], "config failed", "fix the config first")
        return loaded
    loaded.results.append(check_key_file(loaded.settings.host.key_file, environ))
    catalog_result, loaded.catalog, loaded.specs = check_catalog(loaded.settings, options)
    loaded.results.append(catalog_result)
    return loaded


# ------------------------------------------------------------------------------ host command


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
    return {
        "python.venv": [python, "-m", "venv", "--help"],
        "python.ensurepip": [python, "-c", "import ensurepip"],
    }


def s3_endpoint(settings: Settings) -> str:
    return settings.s3.endpoint_url or f"https://s3.{settings.s3.region}.amazonaws.com"


def host_spec(settings: Settings, groups: frozenset[str], bucket: str | None) -> dict[str, Any]:
    """What ``validate_host.py`` does for the selected groups (all read-only)."""
    from .probe import probe_command, probe_script
    from .pull import venv_python

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
        tail = _line(result.stderr_tail(2) or result.stdout[-200:])
        detail = f": {tail}" if tail else ""
        raise DeployError(
            f"the host check answered no JSON (exit {result.exit_code}){detail}",
            hint="run `python3 --version` on the host; remote.python must be Python 3.8+",
        )
    if "fatal" in data:
        raise DeployError(f"the host check failed on the host: {data['fatal']}")
    return _with_facts(data, python)


def _with_facts(data: dict[str, Any], python: str) -> HostAnswer:
    from .errors import ProbeError
    from .probe import parse_probe_output

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


# ------------------------------------------------------------------------------ ssh


def check_ssh(host: Executor, known_hosts: Path | None) -> CheckResult:
    """Connect (host key verified, key auth) and time one trivial command."""
    before = _read_bytes(known_hosts)
    started = time.monotonic()
    try:
        host.run(["true"], timeout=RTT_TIMEOUT_S, what="ssh round trip")
    except DeployError as exc:
        return replace(ssh_failure(exc), duration_s=time.monotonic() - started)
    total = time.monotonic() - started
    connect = getattr(host, "connect_seconds", None) or 0.0
    value = (
        f"{host.target}: host key verified, key auth ok, connect {connect * 1000:.0f} ms, "
        f"round trip {(total - connect) * 1000:.0f} ms"
    )
    if known_hosts is not None and _read_bytes(known_hosts) != before:
        value += f"; first-seen host key recorded in {known_hosts}"
    return ok("ssh", value, total)


def _read_bytes(path: Path | None) -> bytes | None:
    try:
        return path.read_bytes() if path is not None else None
    except OSError:
        return None


def ssh_failure(exc: DeployError) -> CheckResult:
    from .errors import AuthError, HostKeyError

    if isinstance(exc, HostKeyError):
        remedy = exc.hint or "verify the host key fingerprint"
    elif isinstance(exc, AuthError):
        remedy = exc.hint or "check host.key_file"
    else:
        remedy = exc.hint or "check host.address/port, the network, and that sshd runs"
    return fail("ssh", _line(str(exc)), remedy)


# ------------------------------------------------------------------------------ sudo


def check_sudo(answer: HostAnswer, settings: Settings) -> CheckResult:
    names = list(sudo_commands(settings))
    failed = [(name, answer.command(name)) for name in names if answer.command(name)["code"] != 0]
    elapsed = max((float(answer.command(n).get("elapsed_s") or 0) for n in names), default=0.0)
    user = settings.host.user
    if not failed:
        ran = [_sudo_label(n) for n in names if n.startswith("sudo:")]
        value = (
            f"passwordless sudo for {user}: ran {', '.join(ran)}; "
            f"{len(names) - len(ran)} more deploy commands permitted (sudo -n -l, not run)"
        )
        return ok("sudo", value, elapsed)
    shown = "; ".join(f"{_sudo_label(n)}: {_why(r)}" for n, r in failed[:3])
    more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
    remedy = (
        f"give {user} passwordless sudo for systemctl, install, journalctl and the file tools "
        f"(e.g. '{user} ALL=(ALL) NOPASSWD:ALL' in /etc/sudoers.d/90-{user})"
    )
    return fail("sudo", f"{len(failed)}/{len(names)} refused: {shown}{more}", remedy, elapsed)


def _sudo_label(name: str) -> str:
    kind, _, argv = name.partition(":")
    return f"sudo -n{' -l' if kind == 'sudo -l' else ''} {argv}"


def _why(result: Mapping[str, Any]) -> str:
    text = str(result.get("err") or "").strip() or str(result.get("out") or "").strip()
    code = result.get("code")
    return _line(text, 120) if text else f"exit {code}"


# ------------------------------------------------------------------------------ resources


def check_ram(facts: HostFacts, min_gb: float) -> CheckResult:
    available, total = facts.memory.available_bytes, facts.memory.total_bytes
    value = f"{_gb(available)} available of {_gb(total)}"
    remedy = "free host memory (stop other services) or use a host with more RAM"
    if available < min_gb * GB:
        return fail("resources.ram", f"{value} (< {min_gb:g} GB)", remedy)
    if available < 2 * min_gb * GB:
        return warn("resources.ram", f"{value} (< {2 * min_gb:g} GB)", remedy)
    return ok("resources.ram", value)


def disk_thresholds(
    specs: Sequence[ModelSpec], margin_gb: float, min_disk_gb: float | None
) -> tuple[float, float]:
    """(fail below, warn below) in GB: an explicit minimum, else the selected models' sizes
    plus the margin: fail when not even the smallest fits, warn when the largest does not."""
    if min_disk_gb is not None:
        return min_disk_gb, min_disk_gb
    sizes = [spec.size_gb for spec in specs] or [0.0]
    return min(sizes) + margin_gb, max(sizes) + margin_gb


def check_disk(facts: HostFacts, thresholds: tuple[float, float]) -> CheckResult:
    disk = facts.disk
    if disk is None:
        errors = "; ".join(e for e in facts.errors if e.startswith("disk")) or "not measured"
        return fail("resources.disk", errors, "check that remote.models_dir is a valid path")
    fail_below, warn_below = thresholds
    where = (
        disk.path if disk.path == disk.measured_path else f"{disk.path} (at {disk.measured_path})"
    )
    value = f"{_gb(disk.free_bytes)} free under {where}"
    remedy = f"free space under {disk.measured_path} (old model revisions) or grow the volume"
    if disk.free_bytes < fail_below * GB:
        return fail("resources.disk", f"{value}, needs ≥ {fail_below:g} GB", remedy)
    if disk.free_bytes < warn_below * GB:
        return warn(
            "resources.disk", f"{value}; the largest selected model needs {warn_below:g} GB", remedy
        )
    return ok("resources.disk", value)


def check_gpu(facts: HostFacts) -> CheckResult:
    gpu = facts.gpu
    if not gpu.devices:
        value = gpu.error or "no GPU found"
        remedy = "install the NVIDIA driver (nvidia-smi); without a GPU only CPU serving works"
        return warn("resources.gpu", value, remedy)
    devices = ", ".join(
        f"{d.name} {d.memory_total_mib} MiB ({d.memory_free_mib} MiB free)" for d in gpu.devices
    )
    driver = f"driver {gpu.driver_version or '?'}, CUDA {gpu.cuda_version or '?'}"
    return ok("resources.gpu", f"{len(gpu.devices)}× {devices}; {driver} via {gpu.source}")


def unit_usage(unit: UnitFacts, facts: HostFacts) -> str:
    """``active/running, RAM 1.2 GB, GPU 14000 MiB`` for a unit."""
    parts = [f"{unit.active_state}/{unit.sub_state}" if unit.sub_state else unit.active_state]
    if unit.active:
        parts.append(f"RAM {_gb(unit.memory_bytes)}")
        used = [gpu.used_by_pids(unit.pid_set) for gpu in facts.gpu.devices]
        if used and all(u is not None for u in used):
            parts.append(f"GPU {sum(u or 0 for u in used) // (1024 * 1024)} MiB")
        elif used:
            parts.append("GPU use unknown")
    if unit.n_restarts:
        parts.append(f"{unit.n_restarts} restarts")
    return ", ".join(parts)


def check_flux_unit(facts: HostFacts) -> CheckResult:
    unit = facts.flux
    name = "resources.flux"
    if unit.load_state == "unknown":
        return fail(name, f"{unit.name}: state unknown", "see the systemd.units check")
    if unit.load_state == "not-found":
        return warn(
            name, f"{unit.name}: not installed", "set remote.flux_service to Flux's unit name"
        )
    value = f"{unit.name}: {unit_usage(unit, facts)}"
    if unit.active_state == "failed":
        return warn(name, value, f"see `sudo journalctl -u {unit.name}`")
    return ok(name, value)


def check_inference_unit(facts: HostFacts) -> CheckResult:
    unit = facts.inference
    name = "resources.inference"
    if unit.load_state == "unknown":
        return fail(name, f"{unit.name}: state unknown", "see the systemd.units check")
    if unit.load_state == "not-found":
        return ok(name, f"{unit.name}: not deployed")
    value = f"{unit.name}: {unit_usage(unit, facts)}"
    if unit.active_state == "failed":
        return warn(name, value, "see `model-deployer logs`; redeploy or `model-deployer undeploy`")
    return ok(name, value)


def check_resources(
    facts: HostFacts, settings: Settings, specs: Sequence[ModelSpec], options: Options
) -> list[CheckResult]:
    policy = settings.policy
    min_ram = policy.ram_margin_gb if options.min_ram_gb is None else options.min_ram_gb
    thresholds = disk_thresholds(specs, policy.disk_margin_gb, options.min_disk_gb)
    rows = [
        check_ram(facts, min_ram),
        check_disk(facts, thresholds),
        check_gpu(facts),
        check_flux_unit(facts),
        check_inference_unit(facts),
    ]
    return [replace(r, duration_s=facts.duration_s) for r in rows]


# ------------------------------------------------------------------------------ systemd


def check_systemd(answer: HostAnswer, settings: Settings) -> list[CheckResult]:
    facts = answer.facts
    version = answer.command("systemd.version")
    reload = answer.command("systemd.reload")
    journal = answer.command("systemd.journal")
    flux = settings.remote.flux_service
    return [
        _units_readable(facts, version, answer.probe_error),
        _command_row(
            "systemd.reload",
            reload,
            "sudo -n systemctl daemon-reload permitted (asked with sudo -l; not run)",
            f"allow {settings.host.user} `systemctl daemon-reload` without a password in sudoers",
        ),
        _command_row(
            "systemd.journal",
            journal,
            f"journalctl -u {flux} readable with sudo",
            f"allow {settings.host.user} `journalctl` without a password in sudoers",
        ),
    ]


def _units_readable(
    facts: HostFacts | None, version: Mapping[str, Any], probe_error: str | None
) -> CheckResult:
    name = "systemd.units"
    elapsed = float(version.get("elapsed_s") or 0.0)
    if version.get("code") != 0:
        return fail(name, f"systemctl: {_why(version)}", "the host must run systemd", elapsed)
    first = str(version.get("out") or "").splitlines()[:1]
    label = first[0].split("(")[0].strip() if first else "systemd"
    if facts is None:
        return fail(name, f"{label}; unit state unknown: {probe_error}", "see the probe error")
    errors = [e for e in facts.errors if e.startswith("systemctl")]
    if errors or facts.flux.load_state == "unknown":
        value = f"{label}; cannot read unit state: {'; '.join(errors) or 'no answer'}"
        return fail(name, value, "check that `systemctl show` works for the SSH user", elapsed)
    units = f"{facts.flux.name} {facts.flux.load_state}, {facts.inference.name} "
    return ok(name, f"{label}; {units}{facts.inference.load_state}", elapsed)


def _command_row(name: str, result: Mapping[str, Any], good: str, remedy: str) -> CheckResult:
    elapsed = float(result.get("elapsed_s") or 0.0)
    if result.get("code") == 0:
        return ok(name, good, elapsed)
    return fail(name, _why(result), remedy, elapsed)


# ------------------------------------------------------------------------------ python


def check_python(answer: HostAnswer, settings: Settings) -> CheckResult:
    python = settings.remote.python
    info = answer.data.get("python") or {}
    version = str(info.get("version") or "?")
    venv, ensurepip = answer.command("python.venv"), answer.command("python.ensurepip")
    space = (answer.data.get("space") or {}).get("service_dir") or {}
    elapsed = max(float(venv.get("elapsed_s") or 0), float(ensurepip.get("elapsed_s") or 0))
    value = f"{python} {version} ({info.get('executable', '?')})"
    if _version_tuple(version) < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return fail(
            "python",
            f"{value}: the service needs Python {need}+",
            f"install Python {need}+ on the host and set remote.python",
            elapsed,
        )
    locked = lock_python()
    if locked and _version_tuple(version)[:2] != locked:
        need = ".".join(map(str, locked))
        return fail(
            "python",
            f"{value}: the service's lock (deployer/locks/server.txt) is made for CPython {need}",
            f"set remote.python to a Python {need} on the host, or make the lock for this one",
            elapsed,
        )
    if venv.get("code") != 0 or ensurepip.get("code") != 0:
        why = _why(venv if venv.get("code") != 0 else ensurepip)
        return fail(
            "python",
            f"{value}: cannot create a venv ({why})",
            "install the venv module: sudo apt-get install python3-venv",
            elapsed,
        )
    return _venv_space(value, space, settings.remote.service_dir, elapsed)


def _venv_space(value: str, space: Mapping[str, Any], where: str, elapsed: float) -> CheckResult:
    free = space.get("free_bytes")
    if not isinstance(free, int):
        reason = space.get("error") or "not measured"
        return warn(
            "python",
            f"{value}; free space for the venv unknown: {reason}",
            f"check that {where} is a valid path",
            elapsed,
        )
    value += f"; venv + ensurepip ok; {_gb(free)} free for the venv under {space['measured_path']}"
    remedy = f"free space under {space['measured_path']} (the venv needs a few GB)"
    if free < VENV_FAIL_GB * GB:
        return fail("python", value, remedy, elapsed)
    if free < VENV_WARN_GB * GB:
        return warn("python", value, remedy, elapsed)
    return ok("python", value, elapsed)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_torch(facts: HostFacts) -> CheckResult:
    """torch on the host (the service venv reuses it) and whether it can use the GPU."""
    software, gpu = facts.software, facts.gpu
    name = "python.torch"
    if not software.torch:
        return ok(name, "torch not installed on the host: the service venv installs its own")
    driver_cuda = gpu.cuda_version
    if software.torch_cuda is None:
        if gpu.devices:
            return warn(
                name,
                f"torch {software.torch} is a CPU-only build: the service would not use the GPU",
                "install a CUDA build of torch for the host's python3 (download.pytorch.org)",
            )
        return ok(name, f"torch {software.torch} (CPU build; no GPU on the host)")
    value = f"torch {software.torch} built for CUDA {software.torch_cuda}"
    if not gpu.devices:
        return warn(name, f"{value}, but no GPU is visible", "see the resources.gpu check")
    if driver_cuda and _version_tuple(software.torch_cuda) > _version_tuple(driver_cuda):
        return warn(
            name,
            f"{value}, the driver supports CUDA {driver_cuda}",
            f"update the NVIDIA driver or install a torch built for CUDA ≤ {driver_cuda}",
        )
    return ok(name, f"{value}; driver CUDA {driver_cuda or '?'}")


# ------------------------------------------------------------------------------ s3


def make_s3(settings: Settings) -> tuple[Any, Any]:
    """A boto3 session (the standard credential chain) and an S3 client with short timeouts
    and no retries: a stopped endpoint is reported at once."""
    import boto3  # lazy: keeps --help fast
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(
        connect_timeout=3,
        read_timeout=5,
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=S3_WORKERS,
    )
    client = session.client(
        "s3", endpoint_url=settings.s3.endpoint_url, region_name=settings.s3.region, config=config
    )
    return session, client


def check_operator_credentials(session: Any) -> CheckResult:
    started = time.monotonic()
    creds = session.get_credentials()
    elapsed = time.monotonic() - started
    if creds is None:
        return fail(
            "s3.credentials",
            "no AWS credentials on this machine",
            "configure credentials (aws configure, AWS_PROFILE or environment variables)",
            elapsed,
        )
    profile = session.profile_name
    return ok("s3.credentials", f"operator: {creds.method} (profile {profile})", elapsed)


def s3_error_text(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{error.get('Code') or status}: {error.get('Message') or 'S3 error'}"
    return _line(str(exc) or type(exc).__name__, 200)


def check_bucket(client: Any, bucket: str, endpoint: str) -> CheckResult:
    started = time.monotonic()
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        remedy = _bucket_remedy(exc)
        value = f"s3://{bucket} at {endpoint}: {s3_error_text(exc)}"
        return fail("s3.bucket", value, remedy, time.monotonic() - started)
    return ok("s3.bucket", f"s3://{bucket} reachable at {endpoint}", time.monotonic() - started)


def _bucket_remedy(exc: Exception) -> str:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return "configure AWS credentials for the operator (see s3.credentials)"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return "check the catalog's bucket (or s3.bucket in the config)"
        return "the credentials need s3:ListBucket on the bucket"
    return "check s3.endpoint_url and that S3 is reachable from this machine"


def prefix_present(client: Any, bucket: str, prefix: str) -> bool:
    page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=20)
    return any(not item["Key"].endswith("/") for item in page.get("Contents", []))


def check_models(
    client: Any, bucket: str, specs: Sequence[ModelSpec], *, explicit: bool
) -> CheckResult:
    """Every selected model's prefix holds objects. Missing: warn for the whole catalog,
    fail when the operator named the models."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(S3_WORKERS, max(len(specs), 1))) as pool:
        found = list(pool.map(lambda s: prefix_present(client, bucket, s.s3_prefix), specs))
    elapsed = time.monotonic() - started
    missing = [spec for spec, present in zip(specs, found, strict=True) if not present]
    value = f"{len(specs) - len(missing)}/{len(specs)} model prefixes present in s3://{bucket}"
    if not missing:
        return ok("s3.models", value, elapsed)
    shown = ", ".join(f"{s.name} ({s.s3_prefix})" for s in missing)
    remedy = (
        f"upload them (scripts/upload_model.py DIR s3://{bucket}/PREFIX) or check only the "
        "models you deploy with --models"
    )
    if explicit:
        return fail("s3.models", f"{value}; missing: {shown}", remedy, elapsed)
    remedy += " (a warning for the whole catalog; --strict fails on it)"
    return warn("s3.models", f"{value}; missing: {shown}", remedy, elapsed)


def operator_s3_checks(
    loaded: Loaded, options: Options, s3_factory: S3Factory
) -> list[CheckResult]:
    settings = loaded.settings
    assert settings is not None
    bucket = settings.s3.bucket or (loaded.catalog.bucket if loaded.catalog else None)
    session, client = s3_factory(settings)
    rows = [check_operator_credentials(session)]
    if bucket is None:
        reason = "config.catalog failed"
        return rows + not_checked(("s3.bucket", "s3.models"), reason, "fix the catalog first")
    rows.append(check_bucket(client, bucket, settings.s3.endpoint_url or "AWS"))
    if rows[-1].status == "fail":
        return rows + not_checked(("s3.models",), "the bucket is not reachable", "see s3.bucket")
    if loaded.catalog is None:
        reason = "config.catalog failed"
        return rows + not_checked(("s3.models",), reason, "fix the catalog or --models first")
    rows.append(check_models(client, bucket, loaded.specs, explicit=options.models is not None))
    return rows


def check_host_s3(answer: HostAnswer, settings: Settings) -> list[CheckResult]:
    aws = answer.data.get("aws") or {}
    user = aws.get("user") or settings.host.user
    status, source = aws.get("status"), aws.get("source")
    where = f"~{user}/.aws/credentials"
    if status == "found":
        creds = ok("s3.host_credentials", f"host ({user}): {source}")
    elif status == "indirect":
        creds = warn(
            "s3.host_credentials",
            f"host ({user}): {source}; cannot resolve it without boto3 on the host",
            "fine if that profile works; otherwise attach an instance profile or fill " + where,
        )
    else:
        detail = aws.get("error") or aws.get("detail") or "none in the environment, "
        creds = fail(
            "s3.host_credentials",
            f"host ({user}): no AWS credentials found ({_line(str(detail), 120)} "
            "shared files or instance profile)",
            f"attach an instance profile with s3:GetObject/ListBucket, or write {where}",
        )
    return [creds, _host_reach(aws.get("endpoint"))]


def _host_reach(endpoint: Mapping[str, Any] | None) -> CheckResult:
    name = "s3.host_reach"
    if not endpoint:
        return fail(name, "not measured", "see the s3.bucket check (no bucket)")
    if endpoint.get("reachable"):
        return ok(name, f"host reaches {endpoint.get('url')} (HTTP {endpoint.get('http_status')})")
    return fail(
        name,
        f"host cannot reach {endpoint.get('url')}: {endpoint.get('error')}",
        "check s3.endpoint_url and the host's network (routes, security group, proxy)",
    )


# ------------------------------------------------------------------------------ health


FieldRule = Callable[[object], str | None]


def _one_of(*allowed: str) -> FieldRule:
    def rule(value: object) -> str | None:
        if value in allowed:
            return None
        return f"expected {' or '.join(repr(a) for a in allowed)}, got {value!r}"

    return rule


def _text(value: object) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"expected text, got {value!r}"


def _mib(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return f"expected an integer ≥ 0 (MiB), got {value!r}"


def _gib_float(value: object) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return None
    return f"expected a number ≥ 0 (GB), got {value!r}"


def _port(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return None
    return f"expected a port number, got {value!r}"


def _iso_timestamp(value: object) -> str | None:
    if isinstance(value, str) and "T" in value:
        try:
            datetime.fromisoformat(value)
            return None
        except ValueError:
            pass
    return f"expected an ISO-8601 date and time, got {value!r}"


#: ``GET /health`` when ready, as the monitor reads it.
HEALTH_SCHEMA: dict[str, FieldRule] = {"status": _one_of("ok"), "timestamp": _iso_timestamp}
#: ``GET /status``: the eight fields the external monitor polls (more are allowed).
STATUS_SCHEMA: dict[str, FieldRule] = {
    "status": _one_of("healthy", "loading", "error", "stopped"),
    "model": _text,
    "gpu_memory_used": _mib,
    "gpu_memory_total": _mib,
    "ram_usage_gb": _gib_float,
    "port": _port,
    "timestamp": _iso_timestamp,
    "service": _one_of("asoba-inference"),
}


def check_shape(body: object, schema: Mapping[str, FieldRule]) -> list[str]:
    """Problems of a decoded JSON body against ``schema``, field by field (empty: fine)."""
    if not isinstance(body, dict):
        return [f"expected a JSON object, got {type(body).__name__}"]
    problems = []
    for name, rule in schema.items():
        if name not in body:
            problems.append(f"{name}: missing")
            continue
        problem = rule(body[name])
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def decode_body(response: Mapping[str, Any]) -> tuple[object, str | None]:
    """(decoded JSON, problem) of one fetched response."""
    if response.get("code") is None:
        return None, f"no answer ({response.get('error') or 'connection failed'})"
    try:
        return json.loads(str(response.get("body") or "")), None
    except ValueError:
        snippet = _line(str(response.get("body") or ""), 60)
        return None, f"HTTP {response['code']}, body is not JSON: {snippet!r}"


def status_problems(
    response: Mapping[str, Any], *, model: str | None, port: int | None
) -> list[str]:
    """Everything wrong with a ``/status`` answer, including model/port mismatches."""
    body, problem = decode_body(response)
    if problem:
        return [problem]
    problems = check_shape(body, STATUS_SCHEMA)
    if problems or not isinstance(body, dict):
        return problems
    if model is not None and body["model"] != model:
        problems.append(f"model: serving {body['model']!r}, deployed {model!r}")
    if port is not None and body["port"] != port:
        problems.append(f"port: says {body['port']}, deployed on {port}")
    if body["gpu_memory_used"] > body["gpu_memory_total"]:
        problems.append("gpu_memory_used: larger than gpu_memory_total")
    return problems


def health_problems(response: Mapping[str, Any]) -> tuple[list[str], bool]:
    """(problems of a ``/health`` answer, whether the service says it is still loading)."""
    body, problem = decode_body(response)
    if problem:
        return [problem], False
    if response.get("code") == 503 and isinstance(body, dict) and body.get("status") == "loading":
        return [], True
    problems = check_shape(body, HEALTH_SCHEMA)
    if response.get("code") != 200:
        problems.insert(0, f"HTTP {response.get('code')}")
    return problems, False


def check_health(answer: HostAnswer, settings: Settings) -> CheckResult:
    facts = answer.facts
    if facts is None:
        return fail("health", f"not checked: {answer.probe_error}", "see the probe error")
    deployed, unit = facts.deployed, facts.inference
    if deployed is None:
        if facts.deployed_error:
            return warn("health", facts.deployed_error, "see `model-deployer status`")
        if unit.active:
            return warn(
                "health",
                f"{unit.name} runs but no deployment is recorded",
                "redeploy with deploy-model, or `model-deployer undeploy`",
            )
        return ok("health", "not deployed")
    where = f"{deployed.model} on :{deployed.port}"
    fetched = answer.data.get("health") or {}
    if not unit.active:
        return warn(
            "health",
            f"{where} deployed but {unit.name} is {unit.active_state}",
            "see `model-deployer logs`; redeploy or `model-deployer undeploy`",
        )
    return _served(where, fetched, deployed.model, deployed.port)


def _served(where: str, fetched: Mapping[str, Any], model: str, port: int) -> CheckResult:
    remedy = (
        f"the service on :{port} does not answer in the monitor's format: check what listens "
        "there (`model-deployer status`) and redeploy"
    )
    health, loading = health_problems(fetched.get("health") or {})
    if loading:
        return warn("health", f"{where}: still loading (/health 503)", "wait and run again")
    status = status_problems(fetched.get("status") or {}, model=model, port=port)
    problems = [f"/health {p}" for p in health] + [f"/status {p}" for p in status]
    if problems:
        return fail("health", f"{where}: " + "; ".join(problems), remedy)
    return ok(
        "health", f"{where}: /health ok, /status has the monitor's {len(STATUS_SCHEMA)} fields"
    )


# ------------------------------------------------------------------------------ host checks


def host_rows(groups: frozenset[str]) -> list[str]:
    return [row for g in GROUPS if g in groups for row in ROWS[g] if row not in OPERATOR_ROWS]


def interpret(
    answer: HostAnswer, loaded: Loaded, options: Options, groups: frozenset[str]
) -> list[CheckResult]:
    settings = loaded.settings
    assert settings is not None
    rows: list[CheckResult] = []
    facts = answer.facts
    if "sudo" in groups:
        rows.append(check_sudo(answer, settings))
    if "resources" in groups:
        if facts is None:
            rows += [_no_facts(name, answer) for name in ROWS["resources"]]
        else:
            rows += check_resources(facts, settings, loaded.specs, options)
    if "systemd" in groups:
        rows += check_systemd(answer, settings)
    if "python" in groups:
        rows.append(check_python(answer, settings))
        rows.append(check_torch(facts) if facts else _no_facts("python.torch", answer))
    if "s3" in groups:
        rows += check_host_s3(answer, settings)
    if "health" in groups:
        rows.append(check_health(answer, settings))
    return rows


def _probe_hint(answer: HostAnswer) -> str:
    return answer.probe_hint or "run the probe by hand: `deploy-model NAME --dry-run --debug`"


def _no_facts(name: str, answer: HostAnswer) -> CheckResult:
    return fail(name, f"not checked: {answer.probe_error}", _probe_hint(answer))


def host_checks(
    loaded: Loaded, options: Options, groups: frozenset[str], host_factory: HostFactory
) -> list[CheckResult]:
    """Everything that needs the host: one connection, two commands."""
    settings = loaded.settings
    assert settings is not None
    rows: list[CheckResult] = []
    host = host_factory(settings, options.trust_new_host_key)
    try:
        ssh = check_ssh(host, getattr(host, "known_hosts", settings.host.known_hosts))
        if ssh.status == "fail":
            names = [r for r in host_rows(groups) if r != "ssh"]
            return [ssh, *not_checked(names, "ssh failed", "fix ssh first")]
        if "ssh" in groups:
            rows.append(ssh)
        rest = groups - {"ssh"}
        rows += guarded(
            host_rows(rest), lambda: run_host(host, loaded, options, rest), debug=options.debug
        )
    finally:
        host.close()
    return rows


def run_host(
    host: Executor, loaded: Loaded, options: Options, groups: frozenset[str]
) -> list[CheckResult]:
    settings = loaded.settings
    assert settings is not None
    if not groups:
        return []
    bucket = settings.s3.bucket or (loaded.catalog.bucket if loaded.catalog else None)
    spec = host_spec(settings, groups, bucket)
    result = host.run(
        host_argv(settings, spec), check=False, timeout=HOST_TIMEOUT_S, what="host checks"
    )
    answer = parse_host_answer(result, settings.remote.python)
    return interpret(answer, loaded, options, groups)


# ------------------------------------------------------------------------------ entry point


def default_host_factory(settings: Settings, trust_new_host_key: bool) -> Executor:
    from .make_plan import open_host

    return open_host(settings, trust_new_host_key=trust_new_host_key)


def run_checks(
    options: Options,
    *,
    environ: Mapping[str, str] | None = None,
    host_factory: HostFactory = default_host_factory,
    s3_factory: S3Factory = make_s3,
) -> Report:
    """Run the selected checks; never raises for a failing check (``debug`` aside)."""
    started = time.monotonic()
    environ = os.environ if environ is None else environ
    loaded = load_config(options, environ)
    groups = options.only
    rows = loaded.shown(groups)
    if loaded.settings is None:
        rest = [r for g in GROUPS if g in groups and g != "config" for r in ROWS[g]]
        rows += not_checked(rest, "config failed", "fix the config first")
        return Report(ordered(rows), options.strict, time.monotonic() - started)

    def on_host() -> list[CheckResult]:
        return host_checks(loaded, options, groups, host_factory)

    def on_s3() -> list[CheckResult]:
        return operator_s3_checks(loaded, options, s3_factory)

    work: list[tuple[list[str], Callable[[], list[CheckResult]]]] = []
    if groups & HOST_GROUPS:
        work.append((host_rows(groups), on_host))
    if "s3" in groups:
        work.append((["s3.credentials", "s3.bucket", "s3.models"], on_s3))
    # The host (SSH) and the operator's S3 calls overlap: neither waits for the other.
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(guarded, names, job, debug=options.debug) for names, job in work]
        for job in jobs:
            rows += job.result()
    return Report(ordered(rows), options.strict, time.monotonic() - started)
