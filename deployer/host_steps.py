"""The steps that change the host, each a ``Step(apply, undo)``; deploy, rollback and undeploy
build their lists from these factories, so the same change is undone the same way whichever
command made it.

A ``Switch`` is what one run switches from: the files, venv and unit state captured before
the first change, which every undo puts back. ``HostSnapshot`` is that capture.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import commands, flux_parking
from .config import Settings
from .errors import HealthCheckTimeout
from .facts import DeploymentState, HostFacts
from .lock import HostLock
from .redact import Secret
from .service_code import current_venv, switch_venv_argv
from .ssh import Executor
from .steps import Step
from .unit import FileWrite, write_file

HEALTH_SCRIPT = Path(__file__).resolve().parent / "remote" / "wait_healthy.py"


class Talk(Protocol):
    """What the steps tell the operator (the deploy's reporter has these and more)."""

    def info(self, message: str) -> None: ...

    def health(self, event: dict[str, Any]) -> None: ...


class Quiet:
    def info(self, message: str) -> None: ...

    def health(self, event: dict[str, Any]) -> None: ...


@dataclass
class HostSnapshot:
    """What the switch replaces, captured before it, so that undo can put it back."""

    files: dict[str, str | None]  # path -> content (None: did not exist)
    venv: str | None
    service_active: bool
    flux_active: bool
    deployed: DeploymentState | None = None
    flux_enabled: bool | None = None
    service_enabled: bool | None = None

    def file(self, path: str) -> str | None:
        return self.files.get(path)


def read_remote(executor: Executor, path: str) -> str | None:
    result = executor.run(["cat", "--", path], sudo=True, check=False)
    return result.stdout if result.ok else None


def snapshot(
    executor: Executor, settings: Settings, paths: list[str], facts: HostFacts
) -> HostSnapshot:
    return HostSnapshot(
        files={path: read_remote(executor, path) for path in paths},
        venv=current_venv(executor, settings),
        service_active=facts.inference.active,
        flux_active=facts.flux.active,
        deployed=facts.deployed,
        flux_enabled=flux_parking.is_enabled(executor, settings.remote.flux_service),
        service_enabled=flux_parking.is_enabled(executor, settings.remote.service_name),
    )


def restore_file(executor: Executor, write: FileWrite, previous: str | None) -> None:
    if previous is None:
        executor.run(commands.remove(write.path), sudo=True)
    else:
        write_file(executor, FileWrite(write.path, Secret(previous), write.mode, write.owner))


def wait_healthy(
    executor: Executor,
    settings: Settings,
    *,
    port: int,
    model: str,
    timeout_s: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    max_restarts: int = 1,
) -> dict[str, Any]:
    """Poll, on the host, until the service is ready; returns its ``/status``."""
    events: list[dict[str, Any]] = []

    def feed(line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        events.append(event)
        if on_event:
            on_event(event)

    result = executor.run(
        [
            settings.remote.python,
            "-",
            str(port),
            model,
            str(timeout_s),
            settings.remote.service_name,
            str(max_restarts),
        ],
        stdin=HEALTH_SCRIPT.read_text(encoding="utf-8"),
        check=False,
        timeout=timeout_s + 60,
        on_output=feed,
        what="wait for health",
    )
    if not events:
        for line in result.stdout.splitlines():
            feed(line)
    last = events[-1] if events else {}
    if result.ok and last.get("event") == "ready":
        return dict(last.get("status") or {})
    reason = {
        "timeout": f"not healthy after {timeout_s:g}s (unit {last.get('unit_state')}, "
        f"health {last.get('health')})",
        "failed": f"the engine failed while starting: {last['reason']}"
        if last.get("reason")
        else f"the service crashed while starting (unit {last.get('unit_state')}, "
        f"restarts {last.get('restarts')})",
        "wrong-model": f"port {port} serves {last.get('serving')!r}, not {model!r}",
    }.get(str(last.get("event")), f"health wait ended with exit {result.exit_code}")
    raise HealthCheckTimeout(reason)


def journal_tail(executor: Executor, settings: Settings, lines: int = 20) -> str:
    result = executor.run(
        commands.journal(settings.remote.service_name, lines), sudo=True, check=False
    )
    return result.stdout.strip()


@dataclass
class Switch:
    """One run's view of the host: where it talks, and what it switches from."""

    executor: Executor
    settings: Settings
    talk: Talk = field(default_factory=Quiet)
    before: HostSnapshot | None = None
    started: bool = False  # the ``start`` step ran: the previous service is down

    @property
    def was(self) -> HostSnapshot:
        assert self.before is not None, "the snapshot is taken before the first change"
        return self.before

    @property
    def unit(self) -> str:
        return self.settings.remote.service_name

    @property
    def flux_unit(self) -> str:
        return self.settings.remote.flux_service


def lock_step(lock: HostLock, *, wait_s: float = 0.0, force: bool = False) -> Step:
    """Take the host lock. Its release is the run's ``finally``, not an undo: a failed run
    still holds it while its undos run."""
    return Step(
        "lock",
        f"take the host's deploy lock under {lock.state_dir}",
        lambda: lock.acquire(wait_s=wait_s, force=force),
    )


def render_unit_step(
    switch: Switch,
    writes: Callable[[], list[FileWrite]],
    venv: Callable[[], str],
    *,
    restart_previous: bool = False,
) -> Step:
    """Write the service's env file and unit, point the venv link, reload systemd. Undo
    writes back what the snapshot held, and once ``start`` has stopped the previous service,
    starts it again and waits for it. ``restart_previous``: undo always restarts the unit
    (a rollback puts back what was there, crashed or not) and does not wait."""
    ex, settings = switch.executor, switch.settings

    def install() -> None:
        try:
            for write in writes():
                write_file(ex, write)
            for argv in switch_venv_argv(settings, venv()):
                ex.run(argv, sudo=True)
            ex.run(commands.daemon_reload(), sudo=True)
        except BaseException:
            # A step that fails part-way is not undone by the walk back (it did not
            # complete), so it puts back what it wrote itself: all or nothing.
            uninstall()
            raise

    def uninstall() -> None:
        before = switch.was
        for write in writes():
            restore_file(ex, write, before.file(write.path))
        if before.venv:
            for argv in switch_venv_argv(settings, before.venv):
                ex.run(argv, sudo=True)
        ex.run(commands.daemon_reload(), sudo=True)
        if restart_previous:
            ex.run(commands.restart(switch.unit), sudo=True, check=False)
        elif before.service_active and switch.started:
            ex.run(commands.reset_failed(switch.unit), sudo=True, check=False)
            ex.run(commands.restart(switch.unit), sudo=True)
            switch.talk.info(f"previous {switch.unit} restarted")
            if before.deployed is not None:
                wait_healthy(
                    ex,
                    settings,
                    port=before.deployed.port,
                    model=before.deployed.model,
                    timeout_s=settings.service.health_timeout_s,
                    on_event=switch.talk.health,
                )

    return Step("render-unit", "write env file and unit, switch venv", install, uninstall)


def stop_flux_step(switch: Switch, *, was_enabled: Callable[[], bool | None]) -> Step:
    """Stop and disable Flux (a reboot must not start it beside us); undo starts it again
    and enables it if it was."""
    ex, unit = switch.executor, switch.flux_unit

    def start_again() -> None:
        flux_parking.unpark(ex, unit, was_enabled=was_enabled(), start=True)
        switch.talk.info(f"{unit} started again")

    return Step("stop-flux", f"stop {unit}", lambda: flux_parking.park(ex, unit), start_again)


def start_flux_step(switch: Switch, *, was_enabled: bool | None) -> Step:
    """Flux back as it was before a replace deploy parked it (enabled again if it was)."""
    ex, unit = switch.executor, switch.flux_unit
    return Step(
        "start-flux",
        f"start {unit} again (and enable it, if it was)",
        lambda: flux_parking.unpark(ex, unit, was_enabled=was_enabled),
    )


def start_step(switch: Switch, *, enable: bool = True) -> Step:
    """(Re)start our unit (and enable it, unless ``enable`` is False). Undo stops it, and
    disables it when it was not enabled before (the render-unit undo then brings the previous
    one back). A start that fails part-way undoes itself."""
    ex, unit = switch.executor, switch.unit

    def start() -> None:
        switch.started = True
        try:
            ex.run(commands.reset_failed(unit), sudo=True, check=False)
            if enable:
                ex.run(commands.enable(unit), sudo=True)
            ex.run(commands.restart(unit), sudo=True)
        except BaseException:
            stop_new()
            raise

    def stop_new() -> None:
        ex.run(commands.stop(unit), sudo=True, check=False)
        before = switch.was
        if enable and not (before.service_enabled or before.service_active):
            ex.run(commands.disable(unit), sudo=True, check=False)

    return Step("start", f"start {unit}", start, stop_new)


def wait_healthy_step(
    switch: Switch, *, port: int, model: str, timeout_s: float, into: dict[str, Any]
) -> Step:
    """Wait for ``/health`` and a ``/status`` naming ``model``; the status lands in ``into``."""

    def wait() -> None:
        into.update(
            wait_healthy(
                switch.executor,
                switch.settings,
                port=port,
                model=model,
                timeout_s=timeout_s,
                on_event=switch.talk.health,
            )
        )

    return Step("wait-healthy", f"wait for /health on port {port}", wait)


def publish_step(switch: Switch, writes: Callable[[], list[FileWrite]]) -> Step:
    """The discovery files that tell other programs on the host where the service is."""
    ex = switch.executor

    def publish() -> None:
        try:
            for write in writes():
                write_file(ex, write)
        except BaseException:
            unpublish()  # all or nothing, as render-unit
            raise

    def unpublish() -> None:
        for write in writes():
            restore_file(ex, write, switch.was.file(write.path))

    return Step("write-discovery-env", "publish the endpoint", publish, unpublish)
