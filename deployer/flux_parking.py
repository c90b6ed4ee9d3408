"""Flux, the resident GPU service, parked for the life of a replace deploy.

A replace deploy stops Flux and disables it, so a reboot of the host does not start it again
beside our model (on a 24 GB GPU the two may not fit). Whether it was enabled before is
recorded (``flux_was_enabled`` in the deployment record); undeploy and rollback restore exactly
that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import commands

if TYPE_CHECKING:
    from .ssh import Executor


def is_enabled(executor: Executor, unit: str) -> bool | None:
    """True/False for enabled/disabled; None for anything else (static, masked, not found)."""
    state = executor.run(commands.systemctl("is-enabled", unit), check=False).stdout.strip()
    return {"enabled": True, "disabled": False}.get(state)


def park(executor: Executor, unit: str) -> None:
    executor.run(commands.stop(unit), sudo=True)
    executor.run(commands.disable(unit), sudo=True, check=False)


def unpark(executor: Executor, unit: str, *, was_enabled: bool | None, start: bool = True) -> None:
    if was_enabled:
        executor.run(commands.enable(unit), sudo=True)
    if start:
        executor.run(commands.start(unit), sudo=True)
