"""The ``health`` group: when a model is deployed, do ``/health`` and ``/status`` answer in the
format the external uptime monitor reads?

The format is ``remote_service.api.monitor`` (``MonitorStatus``, ``MonitorHealth``): the
same models the server's ``/status`` is built from, so the checks cannot drift from what the
server sends. A body is validated strictly (``"1200"`` is not a number of MiB) and every
problem is one line naming the field and what the monitor expects there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from remote_service.api.monitor import MonitorHealth, MonitorStatus, expected

from .report import CheckResult, fail, ok, one_line, warn

if TYPE_CHECKING:
    from ..config import Settings
    from .host_spec import HostAnswer

Shape = TypeVar("Shape", bound=BaseModel)


def validated(body: object, model: type[Shape]) -> tuple[Shape | None, list[str]]:
    """A decoded JSON body as ``model`` (None when it does not fit) and its problems, field by
    field in the model's order: every field must be present (defaults do not count) and
    hold what the monitor expects. Fields the model does not name are allowed."""
    if not isinstance(body, dict):
        return None, [f"expected a JSON object, got {type(body).__name__}"]
    try:
        parsed: Shape | None = model.model_validate(body, strict=True)
        wrong: set[str] = set()
    except ValidationError as exc:
        parsed = None
        wrong = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
    problems = []
    for name in model.model_fields:
        if name not in body:
            problems.append(f"{name}: missing")
        elif name in wrong:
            problems.append(f"{name}: expected {expected(model, name)}, got {body[name]!r}")
    return (None if problems else parsed), problems


def check_shape(body: object, model: type[BaseModel]) -> list[str]:
    """Problems of a decoded JSON body against ``model`` (empty: fine)."""
    return validated(body, model)[1]


def decode_body(response: Mapping[str, Any]) -> tuple[object, str | None]:
    """(decoded JSON, problem) of one fetched response."""
    if response.get("code") is None:
        return None, f"no answer ({response.get('error') or 'connection failed'})"
    try:
        return json.loads(str(response.get("body") or "")), None
    except ValueError:
        snippet = one_line(str(response.get("body") or ""), 60)
        return None, f"HTTP {response['code']}, body is not JSON: {snippet!r}"


def status_problems(
    response: Mapping[str, Any], *, model: str | None, port: int | None
) -> list[str]:
    """Everything wrong with a ``/status`` answer, including model/port mismatches."""
    body, problem = decode_body(response)
    if problem:
        return [problem]
    status, problems = validated(body, MonitorStatus)
    if status is None:
        return problems
    if model is not None and status.model != model:
        problems.append(f"model: serving {status.model!r}, deployed {model!r}")
    if port is not None and status.port != port:
        problems.append(f"port: says {status.port}, deployed on {port}")
    if status.gpu_memory_used > status.gpu_memory_total:
        problems.append("gpu_memory_used: larger than gpu_memory_total")
    return problems


def health_problems(response: Mapping[str, Any]) -> tuple[list[str], bool]:
    """(problems of a ``/health`` answer, whether the service says it is still loading)."""
    body, problem = decode_body(response)
    if problem:
        return [problem], False
    if response.get("code") == 503 and isinstance(body, dict) and body.get("status") == "loading":
        return [], True
    problems = check_shape(body, MonitorHealth)
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
        "health",
        f"{where}: /health ok, /status has the monitor's {len(MonitorStatus.model_fields)} fields",
    )
