"""Day-2 operations on the host: status, logs, undeploy, rollback, Flux, audit, unlock.

Each function takes an executor and settings and returns plain data; the CLI renders it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from . import audit, commands, flux_parking
from .apply import restore_file, wait_healthy
from .config import Settings
from .errors import DeployError, HealthCheckTimeout
from .facts import STATE_FILE_NAME, HostFacts
from .lock import HostLock, LockInfo, break_lock, lock_status
from .operator_input import within
from .probe import inspect_host
from .releases import Release, Releases
from .service_code import switch_venv_argv, venv_link
from .ssh import Executor
from .steps import Step, StepFailure, run_steps
from .unit import (
    DISCOVERY_ENVIRONMENT_D,
    DISCOVERY_PROFILE,
    FileWrite,
    env_file_path,
    refuse_foreign_unit,
    unit_path,
    write_file,
)

GIB = 1024**3
#: Shown what an operation will change, before it changes anything; raises to stop it.
Confirm = Callable[[list[str]], None]


def _under_models_dir(path: str, models_dir: str) -> bool:
    """A recorded model path <models_dir>/<name>/<revision>, nothing above it (a record is
    data: never trust it blindly)."""
    parts = PurePosixPath(path).parts
    deep_enough = len(parts) > len(PurePosixPath(models_dir).parts) + 1
    return deep_enough and within(path, models_dir) and ".." not in parts


@dataclass
class ServiceStatus:
    host: str
    service: str
    state: str
    port: int | None
    model: str | None
    quantization: str | None
    revision: str | None
    health: str
    restarts: int
    flux: str
    gpu: list[dict[str, Any]] = field(default_factory=list)
    ram_total_gb: float = 0.0
    ram_available_gb: float = 0.0
    service_memory_gb: float | None = None
    status: dict[str, Any] = field(default_factory=dict)
    lock: str | None = None
    code_id: str | None = None  # the service code and lock the venv was built from
    lock_hash: str | None = None  # deployer/locks/server.txt of that venv

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _health(executor: Executor, settings: Settings, port: int, model: str) -> dict[str, Any]:
    try:
        status = wait_healthy(
            executor, settings, port=port, model=model, timeout_s=0.0, max_restarts=10**6
        )
    except HealthCheckTimeout as exc:
        return {"health": "unhealthy", "reason": str(exc)}
    return {"health": "ok", "status": status}


def service_status(executor: Executor, settings: Settings) -> ServiceStatus:
    facts = inspect_host(executor, settings.remote)
    deployed = facts.deployed
    inference = facts.inference
    port = deployed.port if deployed else None
    health: dict[str, Any] = {"health": "not deployed" if deployed is None else "down"}
    if deployed is not None and inference.active and port:
        health = _health(executor, settings, port, deployed.model)
    lock = lock_status(executor, settings.remote.state_dir)
    return ServiceStatus(
        host=executor.target,
        service=inference.name,
        state=f"{inference.active_state}/{inference.sub_state}",
        port=port,
        model=deployed.model if deployed else None,
        quantization=deployed.quantization if deployed else None,
        revision=deployed.revision if deployed else None,
        health=health["health"],
        restarts=inference.n_restarts or 0,
        flux=f"{facts.flux.active_state}/{facts.flux.sub_state}",
        gpu=[
            {
                "index": g.index,
                "name": g.name,
                "used_mib": g.memory_used_mib,
                "total_mib": g.memory_total_mib,
            }
            for g in facts.gpu.devices
        ],
        ram_total_gb=round(facts.memory.total_bytes / GIB, 1),
        ram_available_gb=round(facts.memory.available_bytes / GIB, 1),
        service_memory_gb=round(inference.memory_bytes / GIB, 2) if inference.active else None,
        status=health.get("status", {}),
        lock=lock.describe() if lock else None,
        code_id=deployed.code_id if deployed else None,
        lock_hash=deployed.lock_hash if deployed else None,
    )


def stream_logs(
    executor: Executor,
    settings: Settings,
    *,
    lines: int,
    follow: bool,
    on_line: Callable[[str], None],
) -> None:
    executor.run(
        commands.journal(settings.remote.service_name, lines, follow=follow),
        sudo=True,
        on_output=on_line,
        what="journalctl",
    )


def flux(executor: Executor, settings: Settings, action: str, *, lock_wait_s: float = 0.0) -> str:
    """Start, stop or restart Flux under the host lock (a deploy may be deciding about it);
    ``status`` only reads."""
    unit = settings.remote.flux_service
    if action in ("start", "stop", "restart"):
        lock = HostLock(executor, settings.remote.state_dir, command=f"flux {action}")
        lock.acquire(wait_s=lock_wait_s)
        try:
            executor.run(commands.systemctl(action, unit), sudo=True, what=f"{action} {unit}")
        finally:
            lock.release()
    result = executor.run(commands.systemctl("is-active", unit), check=False)
    return result.stdout.strip() or "unknown"


@dataclass
class UndeployResult:
    removed: list[str]
    flux: str


def undeploy(
    executor: Executor,
    settings: Settings,
    *,
    purge_models: bool = False,
    start_flux: bool = True,
    lock_wait_s: float = 0.0,
    confirm: Confirm | None = None,
) -> UndeployResult:
    """Stop and remove our service; start Flux again. Idempotent: nothing deployed is fine.

    ``purge_models`` deletes the model directories the release records name, and only those:
    other models under ``models_dir`` are not this tool's to delete. ``confirm`` is shown what
    will change before anything does (it raises to stop)."""
    remote = settings.remote
    unit = remote.service_name
    lock = HostLock(executor, remote.state_dir, command="undeploy")
    lock.acquire(wait_s=lock_wait_s)
    removed: list[str] = []
    try:
        refuse_foreign_unit(executor, settings)
        releases = Releases(executor, remote.state_dir)
        running = releases.current()
        flux_was_enabled = bool(running and running.extra.get("flux_was_enabled"))
        models = sorted(releases.model_paths_in_use())
        models = [m for m in models if _under_models_dir(m, remote.models_dir)]
        changes = []
        if executor.run(commands.test_path("-e", unit_path(settings)), check=False).ok:
            changes.append(f"stops and removes {unit}")
        if purge_models and models:
            changes.append("deletes " + ", ".join(models))
        if confirm is not None:
            confirm(changes)
        executor.run(commands.stop(unit), sudo=True, check=False)
        executor.run(commands.disable(unit), sudo=True, check=False)
        executor.run(commands.reset_failed(unit), sudo=True, check=False)
        paths = [
            unit_path(settings),
            DISCOVERY_PROFILE,
            DISCOVERY_ENVIRONMENT_D,
            f"{remote.state_dir}/{STATE_FILE_NAME}",
        ]
        for path in paths:
            if executor.run(commands.test_path("-e", path), check=False).ok:
                removed.append(path)
        executor.run(commands.remove(*paths), sudo=True)
        executor.run(commands.remove_tree(remote.service_dir), sudo=True)
        removed.append(remote.service_dir)
        if purge_models:
            for path in models:
                executor.run(commands.remove_tree(path), sudo=True)
                removed.append(path)
                # The model's own directory goes too once nothing but the pull's own
                # bookkeeping (its lock file, staging) is left in it.
                parent = path.rsplit("/", 1)[0]
                others = executor.run(
                    ["find", parent, "-mindepth", "1", "-maxdepth", "1", "!", "-name",
                     ".pull.lock", "!", "-name", ".staging-*"],
                    sudo=True,
                    check=False,
                )  # fmt: skip
                if others.ok and not others.stdout.strip():
                    executor.run(commands.remove_tree(parent), sudo=True)
        executor.run(commands.daemon_reload(), sudo=True)
        state = "unchanged"
        if start_flux:
            # Back as it was before a replace deploy parked it: enabled again if it was.
            flux_parking.unpark(executor, remote.flux_service, was_enabled=flux_was_enabled)
            state = "active"
        audit.append(
            executor,
            remote.state_dir,
            audit.AuditEntry("undeploy", "ok", details={"removed": removed}),
            python=remote.python,
        )
    finally:
        lock.release()
    return UndeployResult(removed, state)


def rollback(
    executor: Executor,
    settings: Settings,
    *,
    lock_wait_s: float = 0.0,
    on_health: Callable[[dict[str, Any]], None] | None = None,
    confirm: Confirm | None = None,
) -> Release:
    """Put the previous release back (its unit, env file, venv and port) and wait for health."""
    remote = settings.remote
    unit = remote.service_name
    releases = Releases(executor, remote.state_dir)
    lock = HostLock(executor, remote.state_dir, command="rollback")
    lock.acquire(wait_s=lock_wait_s)
    started = time.monotonic()
    try:
        refuse_foreign_unit(executor, settings)
        current = releases.current()
        target = releases.previous()
        if target is None:
            raise DeployError("no previous release to roll back to")
        if not target.env_file or not target.extra.get("venv"):
            raise DeployError(f"release #{target.number} lacks its env file or venv")
        if confirm is not None:
            running = f"{current.model} (release #{current.number})" if current else "the service"
            confirm([f"replaces {running} with release #{target.number} ({target.model})"])
        env_text = executor.run(["cat", "--", target.env_file], sudo=True).stdout
        facts: HostFacts = inspect_host(executor, remote)
        old_unit = executor.run(["cat", "--", unit_path(settings)], sudo=True, check=False)
        old_env = executor.run(["cat", "--", env_file_path(settings)], sudo=True, check=False)
        old_venv = executor.run(["readlink", "--", venv_link(settings)], check=False)
        user = remote.service_user
        flux_must_stop = bool(target.extra.get("flux_stopped")) and facts.flux.active

        def install() -> None:
            write_file(executor, FileWrite(env_file_path(settings), env_text, "0600", user))
            write_file(executor, FileWrite(unit_path(settings), target.unit_text))
            for argv in switch_venv_argv(settings, str(target.extra["venv"])):
                executor.run(argv, sudo=True)
            executor.run(commands.daemon_reload(), sudo=True)

        def uninstall() -> None:
            restore_file(
                executor,
                FileWrite(env_file_path(settings), "", "0600", user),
                old_env.stdout if old_env.ok else None,
            )
            restore_file(
                executor,
                FileWrite(unit_path(settings), ""),
                old_unit.stdout if old_unit.ok else None,
            )
            if old_venv.ok and old_venv.stdout.strip():
                for argv in switch_venv_argv(settings, old_venv.stdout.strip()):
                    executor.run(argv, sudo=True)
            executor.run(commands.daemon_reload(), sudo=True)
            executor.run(commands.restart(unit), sudo=True, check=False)

        def wait() -> None:
            wait_healthy(
                executor,
                settings,
                port=target.port,
                model=target.model,
                timeout_s=settings.service.health_timeout_s,
                on_event=on_health,
            )

        steps = [Step("render-unit", "restore the previous unit", install, uninstall)]
        now_enabled = flux_parking.is_enabled(executor, remote.flux_service)
        if flux_must_stop or (target.extra.get("flux_stopped") and now_enabled):
            steps.append(
                Step(
                    "stop-flux",
                    "stop and disable Flux",
                    lambda: flux_parking.park(executor, remote.flux_service),
                    lambda: flux_parking.unpark(
                        executor, remote.flux_service, was_enabled=now_enabled, start=True
                    ),
                )
            )
        steps.append(
            Step(
                "start",
                "restart the service",
                lambda: executor.run(commands.restart(unit), sudo=True),
            )
        )
        steps.append(Step("wait-healthy", "wait for health", wait))
        if not target.extra.get("flux_stopped") and not facts.flux.active:
            parked_enabled = bool(current and current.extra.get("flux_was_enabled"))
            steps.append(
                Step(
                    "start-flux",
                    "start Flux again (and enable it, if it was)",
                    lambda: flux_parking.unpark(
                        executor, remote.flux_service, was_enabled=parked_enabled
                    ),
                )
            )
        try:
            run_steps(steps)
        except StepFailure as failure:
            raise DeployError(
                f"rollback to #{target.number} failed at {failure.step}: {failure.error}; "
                f"release #{current.number if current else '?'} restored"
            ) from None
        state = {
            **json.loads(target.to_json()),
            **{k: v for k, v in target.extra.items() if k != "venv"},
        }
        releases.set_current(target)
        # set_current writes the Release form; keep the probe's keys too.
        write_file(
            executor,
            FileWrite(
                f"{remote.state_dir}/{STATE_FILE_NAME}", json.dumps(state, indent=1) + "\n", "0644"
            ),
        )
        audit.append(
            executor,
            remote.state_dir,
            audit.AuditEntry(
                "rollback",
                "ok",
                model=target.model,
                duration_s=time.monotonic() - started,
                details={"release": target.number},
            ),
            python=remote.python,
        )
        return target
    finally:
        lock.release()


def audit_tail(executor: Executor, settings: Settings, n: int) -> list[dict[str, Any]]:
    return audit.tail(executor, settings.remote.state_dir, n)


def unlock(executor: Executor, settings: Settings) -> LockInfo | None:
    """Break the host lock (after the operator made sure its holder is gone)."""
    return break_lock(executor, settings.remote.state_dir)
