"""The format the external uptime monitor reads: ``GET /status`` and a ready ``GET /health``.

Stated once, here: the server's ``/status`` answer (``StatusResponse``) extends
``MonitorStatus``, and the operator's pre-flight checks (``validate-components``) validate a
fetched body against the same models. So what the server sends and what the checks accept
cannot drift apart.

This module needs pydantic and nothing else (no FastAPI, no torch): the operator's machine
imports it without the server's dependencies.

Each field's type carries an ``Expected`` note, the phrase a problem line uses
("gpu_memory_used: expected an integer ≥ 0 (MiB), got '1200'"): the checks report what the
monitor needs, not pydantic's wording.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from remote_service import SERVICE_NAME


@dataclass(frozen=True)
class Expected:
    """What a field must hold, in words, for problem lines (pydantic ignores this note)."""

    text: str


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank")
    return value


def _iso_datetime(value: str) -> str:
    """An ISO-8601 date *and* time (a bare date is not a timestamp)."""
    if "T" not in value:
        raise ValueError("no time")
    datetime.fromisoformat(value)  # ValueError when not ISO-8601
    return value


Text = Annotated[str, AfterValidator(_not_blank), Expected("text")]
MiB = Annotated[int, Field(ge=0), Expected("an integer ≥ 0 (MiB)")]
GiBUsed = Annotated[float, Field(ge=0), Expected("a number ≥ 0 (GB)")]
Port = Annotated[int, Field(gt=0, lt=65536), Expected("a port number")]
Timestamp = Annotated[str, AfterValidator(_iso_datetime), Expected("an ISO-8601 date and time")]
StatusWord = Annotated[
    Literal["healthy", "loading", "error", "stopped"],
    Expected("'healthy' or 'loading' or 'error' or 'stopped'"),
]
ServiceName = Annotated[Literal["asoba-inference"], Expected(repr(SERVICE_NAME))]


class MonitorStatus(BaseModel):
    """``GET /status``: the eight fields the external monitor polls (more are allowed)."""

    status: StatusWord
    model: Text
    gpu_memory_used: MiB = Field(description="MiB, all GPUs; 0 without a GPU")
    gpu_memory_total: MiB = Field(description="MiB, all GPUs; 0 without a GPU")
    ram_usage_gb: GiBUsed = Field(description="Host RAM in use, GiB")
    port: Port
    timestamp: Timestamp
    service: ServiceName = "asoba-inference"  # remote_service.SERVICE_NAME


class MonitorHealth(BaseModel):
    """``GET /health`` of a service that serves, as the monitor reads it."""

    status: Annotated[Literal["ok"], Expected("'ok'")]
    timestamp: Timestamp


def expected(model: type[BaseModel], field: str) -> str:
    """The ``Expected`` phrase of ``model.field`` (its type name when it has none)."""
    info = model.model_fields[field]
    for note in info.metadata:
        if isinstance(note, Expected):
            return note.text
    return getattr(info.annotation, "__name__", str(info.annotation))
