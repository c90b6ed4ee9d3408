"""Consent before changes an operator may not expect: stopping Flux, replacing the running
model, stopping or removing the service, deleting model data.

On a terminal the tool asks; ``--yes`` (or ``MODEL_DEPLOYER_YES=1``, for scripts) answers in
advance. Without a terminal and without it, the command stops with one line and exit 2,
having changed nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import DeployError

if TYPE_CHECKING:
    from .planner import Plan

Ask = Callable[[str], bool]


class ConsentRequired(DeployError):
    exit_code = 2


def deploy_changes(plan: Plan, flux_service: str) -> list[str]:
    """What applying ``plan`` changes that needs consent (empty: nothing)."""
    out = []
    facts = plan.facts
    if plan.stop_flux and facts.flux_state == "active":
        out.append(f"stops {flux_service}")
    running = facts.deployed
    if (
        running is not None
        and facts.inference_state == "active"
        and (running.model, running.quantization, running.port)
        != (plan.model, plan.quantization, plan.port)
    ):
        out.append(
            f"replaces the running {running.model} ({running.quantization}, :{running.port})"
        )
    return out


def require(
    what: str,
    changes: Sequence[str],
    *,
    yes: bool,
    interactive: bool | None = None,
    ask: Ask | None = None,
) -> None:
    """Go on only with consent for ``changes`` (nothing to consent to: go on)."""
    if not changes or yes:
        return
    summary = f"{what} " + "; ".join(changes)
    if interactive is None:
        interactive = sys.stdin.isatty() and sys.stderr.isatty()
    if not interactive:
        raise ConsentRequired(
            f"{summary}: not confirmed",
            hint="add --yes to go ahead (there is no terminal to ask on)",
        )
    if ask is None:
        import click

        def ask(question: str) -> bool:
            return bool(click.confirm(question, default=False, err=True))

    if not ask(f"{summary}. Go ahead?"):
        raise ConsentRequired(f"{summary}: not confirmed; nothing was changed")
