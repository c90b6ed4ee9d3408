"""A reviewed plan, saved and applied later: ``deploy-model NAME --dry-run --json > plan.json``
then ``deploy-model --plan plan.json``.

The saved plan is applied only as it is: it is refused, with the differences, when

- the file was edited (its ``plan_id`` no longer matches what it decides),
- the code or the lock differ from the ones it was made with,
- it was made for another host, or
- planning again now, on the host as it is, decides anything differently.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from .config import Settings
from .errors import ConfigError, PlanOutdated
from .facts import HostFacts
from .operator_input import read_operator_file
from .planner import Plan, decision_changes, plan_id
from .service_code import code_id, lock_hash

# What the CLI's JSON output carries beside the plan itself (after a deploy).
_NOT_THE_PLAN = ("apply",)


def load_saved_plan(path: str) -> Plan:
    text = read_operator_file(Path(path), kind="plan file", label=path, error=ConfigError)
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number past the int digit limit
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ConfigError(f"{path}: not a plan (invalid JSON: {detail})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a plan (expected a JSON object)")
    for key in _NOT_THE_PLAN:
        data.pop(key, None)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "plan"
        raise ConfigError(
            f"{path}: not a plan this version can apply ({where}: {first['msg']})"
        ) from None
    if plan_id(plan) != plan.plan_id:
        raise ConfigError(
            f"{path} was edited: its plan_id {plan.plan_id} does not match what it decides",
            hint="make the plan again with --dry-run --json",
        )
    return plan


def check_saved_plan(saved: Plan, fresh: Plan, facts: HostFacts, settings: Settings) -> None:
    """Refuse ``saved`` unless applying it now is applying what was reviewed."""
    problems = []
    if saved.code_id != code_id() or saved.lock_hash != lock_hash():
        problems.append(
            f"the code or lock differ (plan: code {saved.code_id}, lock {saved.lock_hash}; "
            f"here: code {code_id()}, lock {lock_hash()})"
        )
    if saved.target != settings.host.address:
        problems.append(f"the plan is for host {saved.target}, not {settings.host.address}")
    if not saved.can_apply:
        problems.append("the plan refused: there is nothing to apply")
    problems += decision_changes(saved, fresh)
    problems += saved.still_holds(facts)
    if problems:
        raise PlanOutdated(
            "refusing the saved plan: " + "; ".join(dict.fromkeys(problems)),
            hint="review a new plan (--dry-run --json) and apply that one",
        )
