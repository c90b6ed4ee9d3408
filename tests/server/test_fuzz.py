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
from schemathesis.generation.modes import GenerationMode

from tests.server.support import ServerProcess

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def operations(live_server: ServerProcess) -> dict[str, Any]:
    schema = schemathesis.openapi.from_url(live_server.base_url + "/openapi.json")
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

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operations[label].as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=live_server.base_url, headers=headers, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        if 400 <= response.status_code < 500:
            assert {"message", "type", "param", "code"} <= set(response.json()["error"])

    check()
    assert seen
