"""The host's audit log: one JSON line per deploy-model run that changed (or tried to change)
the host, in ``<state_dir>/audit.log``.

Lines are appended with ``sudo tee -a`` and the content on stdin, never in argv, after a pass
through the redactor (API keys, credential-shaped strings and sensitive keys are replaced by
``[REDACTED]``). Each line is written by one ``write(2)`` on an ``O_APPEND`` file, so lines of
concurrent writers do not interleave; the log is never rewritten by the deployer.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .errors import RemoteCommandFailed
from .redact import Redactor, Secret

if TYPE_CHECKING:
    from .ssh import Executor

AUDIT_NAME = "audit.log"
#: A line stays below PIPE_BUF-sized writes in practice; longer plan summaries are cut.
MAX_LINE = 3800


def audit_path(state_dir: str) -> str:
    return f"{state_dir.rstrip('/')}/{AUDIT_NAME}"


def operator_id() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class AuditEntry:
    """One run: who, what, with which plan, and how it ended."""

    command: str
    outcome: str  # ok | failed | rolled-back | refused | dry-run ...
    model: str | None = None
    plan: Mapping[str, Any] | str | None = None
    duration_s: float | None = None
    error: str | None = None
    operator: str = field(default_factory=operator_id)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    details: Mapping[str, Any] = field(default_factory=dict)

    def record(self, redactor: Redactor | None = None) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        data = {k: v for k, v in values.items() if v is not None and v != {} and v != ""}
        if self.duration_s is not None:
            data["duration_s"] = round(self.duration_s, 2)
        return (redactor or Redactor())(data)  # type: ignore[no-any-return]


def render_line(entry: AuditEntry, *, secrets: Iterable[Secret | str] = ()) -> str:
    """The redacted JSON line (with its newline); over-long plans are shortened."""
    record = entry.record(Redactor(secrets))
    line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    if len(line) > MAX_LINE and "plan" in record:
        record["plan"] = str(json.dumps(record["plan"], default=str))[:1000] + "..."
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    if len(line) > MAX_LINE and "details" in record:
        record["details"] = {"truncated": True}
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return line + "\n"


def append_argv(state_dir: str) -> list[str]:
    return ["tee", "-a", "--", audit_path(state_dir)]


def append(
    executor: Executor,
    state_dir: str,
    entry: AuditEntry,
    *,
    sudo: bool = True,
    secrets: Iterable[Secret | str] = (),
) -> str:
    """Append ``entry`` to the host's audit log; returns the line written."""
    line = render_line(entry, secrets=secrets)
    executor.run(["mkdir", "-p", "-m", "0755", state_dir], sudo=sudo, what="audit log")
    executor.run(append_argv(state_dir), sudo=sudo, stdin=line, what="audit log")
    return line


def tail(executor: Executor, state_dir: str, n: int = 20, *, sudo: bool = True) -> list[dict]:
    """The last ``n`` entries, oldest first; unreadable lines are skipped, no log is []."""
    if n <= 0:
        return []
    path = audit_path(state_dir)
    result = executor.run(
        ["tail", "-n", str(n), "--", path], sudo=sudo, check=False, what="audit log"
    )
    if not result.ok:
        exists = executor.run(["test", "-e", path], sudo=sudo, check=False).ok
        if not exists:
            return []
        raise RemoteCommandFailed(result, what=f"read {path}")
    entries = []
    for line in result.stdout.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            entries.append(data)
    return entries
