"""Day-2 operations on the host: status, logs, undeploy, rollback, Flux, audit, unlock.

Each function takes an executor and settings and returns plain data; the CLI renders it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol, TypeVar

from . import audit, commands
from .config import Settings
from .errors import DeployError, HealthCheckTimeout
from .facts import HostFacts
from .host_setup import ensure_service_user
from .host_steps import (
    Switch,
    render_unit_step,
    snapshot,
    start_flux_step,
    start_step,
    stop_flux_step,
    wait_healthy,
    wait_healthy_step,
)
from .lock import HostLock, LockInfo, break_lock, lock_status
from .operator_input import within
from .probe import inspect_host
from .releases import Release, Releases
from .service_code import engine_venv_of, venv_complete
from .ssh import Executor
from .steps import StepFailure, run_steps
from .unit import (
    DISCOVERY_ENVIRONMENT_D,
    DISCOVERY_PROFILE,
    FileWrite,
    env_file_path,
    refuse_foreign_unit,
    unit_path,
)

GIB = 1024**3
#: Shown what an operation will change, before it changes anything; raises to stop it.
Confirm = Callable[[list[str]], None]
OnDiskT = TypeVar("OnDiskT", bound="OnDisk")


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
    will change before anything does (it raises to stop). Nothing here has an undo: removing
    is what was asked for, and each command is safe to run again."""
    remote = settings.remote
    unit = remote.service_name
    releases = Releases(executor, remote.state_dir)
    lock = HostLock(executor, remote.state_dir, command="undeploy")
    lock.acquire(wait_s=lock_wait_s)
    removed: list[str] = []
    try:
        refuse_foreign_unit(executor, settings)
        running = releases.current()
        flux_was_enabled = bool(running and running.state.flux_was_enabled)
        models = [
            m
            for m in sorted(releases.model_paths_in_use())
            if _under_models_dir(m, remote.models_dir)
        ]
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
        paths = [unit_path(settings), DISCOVERY_PROFILE, DISCOVERY_ENVIRONMENT_D]
        for path in [*paths, releases.current_path]:
            if executor.run(commands.test_path("-e", path), check=False).ok:
                removed.append(path)
        executor.run(commands.remove(*paths), sudo=True)
        releases.clear_current()
        executor.run(commands.remove_tree(remote.service_dir), sudo=True)
        removed.append(remote.service_dir)
        executor.run(commands.daemon_reload(), sudo=True)

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
        if start_flux:
            start_flux_step(Switch(executor, settings), was_enabled=flux_was_enabled).apply()
        entry = audit.AuditEntry("undeploy", "ok", details={"removed": removed})
        audit.append(executor, remote.state_dir, entry, python=remote.python)
    finally:
        lock.release()
    return UndeployResult(removed, "active" if start_flux else "unchanged")


def rollback(
    executor: Executor,
    settings: Settings,
    *,
    lock_wait_s: float = 0.0,
    on_health: Callable[[dict[str, Any]], None] | None = None,
    confirm: Confirm | None = None,
) -> Release:
    """Put the previous release back (its unit, env file, venv and port) and wait for health.

    The same steps as a deploy's switch (``deployer.host_steps``), with the same undos: a
    rollback that fails puts the current release back."""
    remote = settings.remote
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
        if not target.env_file or not target.venv:
            raise DeployError(f"release #{target.number} lacks its env file or venv")
        env_text = executor.run(["cat", "--", target.env_file], sudo=True).stdout
        _refuse_missing_venvs(executor, target, env_text)
        if confirm is not None:
            running = f"{current.model} (release #{current.number})" if current else "the service"
            confirm([f"replaces {running} with release #{target.number} ({target.model})"])
        ensure_service_user(executor, remote.service_user)
        facts: HostFacts = inspect_host(executor, remote)
        writes = [
            FileWrite(env_file_path(settings), env_text, "0600", remote.service_user),
            FileWrite(unit_path(settings), target.unit_text),
        ]
        switch = Switch(executor, settings, talk=_HealthTalk(on_health))
        switch.before = snapshot(executor, settings, [w.path for w in writes], facts)
        venv = target.venv
        now_enabled = switch.before.flux_enabled
        wants_flux_parked = target.state.flux_stopped
        steps = [render_unit_step(switch, lambda: writes, lambda: venv, restart_previous=True)]
        if wants_flux_parked and (facts.flux.active or now_enabled):
            steps.append(stop_flux_step(switch, was_enabled=lambda: now_enabled))
        steps.append(start_step(switch, enable=False))
        steps.append(
            wait_healthy_step(
                switch,
                port=target.port,
                model=target.model,
                timeout_s=settings.service.health_timeout_s,
                into={},
            )
        )
        if not wants_flux_parked and not facts.flux.active:
            parked = current.state.flux_was_enabled if current else None
            steps.append(start_flux_step(switch, was_enabled=bool(parked)))
        try:
            run_steps(steps)
        except StepFailure as failure:
            restored = f"release #{current.number if current else '?'} restored"
            if failure.undo_errors:
                restored = "ROLLBACK INCOMPLETE: " + "; ".join(
                    f"{step}: {error}" for step, error in failure.undo_errors
                )
            raise DeployError(
                f"rollback to #{target.number} failed at {failure.step}: {failure.error}; "
                + restored
            ) from None
        releases.set_current(target)
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


def _refuse_missing_venvs(executor: Executor, target: Release, env_text: str) -> None:
    """The venvs ``target`` runs in (the service's, and the engine's its env file names) must
    still be whole: undeploy removes them, and a unit pointed at a missing venv cannot start."""
    try:
        engine = engine_venv_of(env_text)
    except ValueError:
        engine = None
    for venv in (target.venv, engine):
        if venv and not venv_complete(executor, venv):
            raise DeployError(
                f"release #{target.number}'s venv {venv} is no longer on the host "
                f"(undeploy and `venvs --prune` remove unused ones); deploy {target.model} again"
            )


@dataclass
class _HealthTalk:
    on_health: Callable[[dict[str, Any]], None] | None

    def info(self, message: str) -> None:
        return None

    def health(self, event: dict[str, Any]) -> None:
        if self.on_health is not None:
            self.on_health(event)


@dataclass(frozen=True)
class ModelOnDisk:
    """One ``<models_dir>/<name>/<revision>`` directory on the host."""

    name: str
    revision: str
    path: str
    size_bytes: int
    live: bool  # the running release serves it
    kept: bool  # a kept release names it (rollback needs it)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def models_on_disk(executor: Executor, settings: Settings) -> list[ModelOnDisk]:
    """What the host holds under ``models_dir``: every revision directory, its size, and
    whether a release needs it. The pulls' own bookkeeping (``.staging-*``) is not listed."""
    models_dir = settings.remote.models_dir.rstrip("/")
    if not executor.run(commands.test_path("-d", models_dir), check=False).ok:
        return []  # no models dir yet: nothing on disk
    listed = executor.run(
        ["find", models_dir, "-mindepth", "2", "-maxdepth", "2", "-type", "d",
         "!", "-name", ".*", "-exec", "du", "--bytes", "--summarize", "--", "{}", "+"],
        check=False,
    )  # fmt: skip
    releases = Releases(executor, settings.remote.state_dir)
    current = releases.current()
    kept = releases.model_paths_in_use()
    found = []
    for line in listed.stdout.splitlines():
        size, _, path = line.partition("\t")
        parts = PurePosixPath(path).parts
        if not size.isdigit() or not _under_models_dir(path, models_dir):
            continue
        found.append(
            ModelOnDisk(
                name=parts[-2],
                revision=parts[-1],
                path=path,
                size_bytes=int(size),
                live=current is not None and current.model_path == path,
                kept=path in kept,
            )
        )
    return sorted(found, key=lambda m: (m.name, m.revision))


class OnDisk(Protocol):
    """Something on the host's disk that a prune may delete."""

    @property
    def path(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...


def prune(
    executor: Executor,
    settings: Settings,
    command: str,
    doomed: Callable[[], Sequence[OnDiskT]],
    *,
    lock_wait_s: float = 0.0,
    confirm: Confirm | None = None,
) -> list[OnDiskT]:
    """Under the host lock (no deploy is using or making them meanwhile): ``doomed()``, shown
    to ``confirm``, deleted and written to the audit log; returns what was deleted."""
    lock = HostLock(executor, settings.remote.state_dir, command=command)
    lock.acquire(wait_s=lock_wait_s)
    try:
        found = list(doomed())
        if confirm is not None:
            confirm([f"deletes {d.path} ({d.size_bytes / GIB:.2f} GiB)" for d in found])
        for item in found:
            executor.run(commands.remove_tree(item.path), sudo=True, what=f"remove {item.path}")
        if found:
            entry = audit.AuditEntry(command, "ok", details={"removed": [d.path for d in found]})
            audit.append(executor, settings.remote.state_dir, entry, python=settings.remote.python)
        return found
    finally:
        lock.release()


def prune_models(
    executor: Executor,
    settings: Settings,
    *,
    lock_wait_s: float = 0.0,
    confirm: Confirm | None = None,
) -> list[ModelOnDisk]:
    """Delete the revisions no kept release needs (after ``confirm``); returns what was
    deleted."""
    return prune(
        executor,
        settings,
        "models --prune",
        lambda: [m for m in models_on_disk(executor, settings) if not (m.live or m.kept)],
        lock_wait_s=lock_wait_s,
        confirm=confirm,
    )


def audit_tail(executor: Executor, settings: Settings, n: int) -> list[dict[str, Any]]:
    return audit.tail(executor, settings.remote.state_dir, n)


def unlock(executor: Executor, settings: Settings) -> LockInfo | None:
    """Break the host lock (after the operator made sure its holder is gone)."""
    return break_lock(executor, settings.remote.state_dir)
