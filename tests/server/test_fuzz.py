"""Schemathesis fuzzes every operation of /openapi.json on the real server: never a 5xx,
and every 4xx is an OpenAI-style error. Bounded: a few derandomized examples per operation.

The schemas' strategies are driven with hypothesis directly (schemathesis' pytest plugin does
not run under this pytest version).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.modes import GenerationMode

from tests.server.support import ServerProcess

MAX_EXAMPLES = 12
# A few derandomized examples per operation: bounded and the same on every run.
BOUNDED = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# A body over ASOBA_MAX_REQUEST_BYTES is refused with 413 before it is parsed: a rejection of
# invalid data like the default list's 400s (a prompt past its maxLength can be that big).
REJECTION_STATUSES = [
    "400", "401", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"
]  # fmt: skip


@pytest.fixture(scope="module")
def operations(live_server: ServerProcess) -> dict[str, Any]:
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTION_STATUSES}}}
    )
    schema = schemathesis.openapi.from_url(live_server.base_url + "/openapi.json", config=config)
    ops = [result.ok() for result in schema.get_all_operations()]
    return {op.label: op for op in ops}


def test_schema_lists_every_endpoint(operations: dict[str, Any]) -> None:
    assert {
        "GET /health",
        "GET /status",
        "GET /",
        "GET /metrics",
        "POST /generate",
        "GET /v1/models",
        "POST /v1/completions",
        "POST /v1/chat/completions",
    } <= set(operations)


POSTS = ["POST /generate", "POST /v1/completions", "POST /v1/chat/completions"]
GETS = ["GET /v1/models", "GET /status", "GET /health"]
CASES = [
    *[(op, GenerationMode.POSITIVE) for op in POSTS + GETS],
    # schema-violating bodies (GETs take no input to violate)
    *[(op, GenerationMode.NEGATIVE) for op in POSTS],
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_no_server_errors(
    label: str, mode: GenerationMode, operations: dict[str, Any], live_server: ServerProcess
) -> None:
    headers = {"Authorization": f"Bearer {live_server.api_key}"}
    seen: list[int] = []

    @BOUNDED
    @given(case=operations[label].as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=live_server.base_url, headers=headers, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        if 400 <= response.status_code < 500:
            assert {"message", "type", "param", "code"} <= set(response.json()["error"])

    check()
    assert seen


# Every schemathesis check (the CLI's `--checks all`), with what is left out and why.
EXCLUDED_CHECKS = {
    # Stateful checks about resources created and deleted through the API: this API creates
    # none (they need links between operations, and every operation here is independent).
    "use_after_free": "no resources are created or deleted",
    "ensure_resource_availability": "no resources are created or deleted",
    "object_level_authorization": "one principal: the API key",
}


def _all_checks() -> list[Any]:
    from schemathesis.checks import CHECKS, load_all_checks

    load_all_checks()
    return [c for c in CHECKS.get_all() if c.__name__ not in EXCLUDED_CHECKS]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_answers_conform_to_the_schema(
    label: str, mode: GenerationMode, operations: dict[str, Any], live_server: ServerProcess
) -> None:
    """Status codes, content types, headers and bodies are those the document declares;
    valid data is accepted and invalid data refused."""
    headers = {"Authorization": f"Bearer {live_server.api_key}"}
    checks = _all_checks()

    @BOUNDED
    @given(case=operations[label].as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=live_server.base_url, headers=headers, timeout=60, checks=checks
        )

    check()
