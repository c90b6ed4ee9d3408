"""The host's audit log: one JSON line per deploy-model run that changed (or tried to change)
the host, in ``<state_dir>/audit.log``.

Lines go to the host on stdin, never in argv, after a pass through the redactor (API keys,
credential-shaped strings and sensitive keys are replaced by ``[REDACTED]``). A small script
run with sudo appends each one under an exclusive ``flock``: it adds ``prev``, the sha256 of the
line before it (64 zeros for the first), and writes the line in one ``write(2)`` on an
``O_APPEND`` file. So lines of concurrent writers neither interleave nor fork the chain, and
``verify`` (``model-deployer audit --verify``) finds any line changed, removed or inserted
since. Each entry also names the SSH key the operator connected with (``key``, its SHA256
fingerprint), which the host's sshd vouched for, beside the operator's own ``user@machine``.
The log is never rewritten by the deployer.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
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
    key: str | None = None  # SHA256 fingerprint of the SSH key used (filled in by append)
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


GENESIS = "0" * 64

# Runs on the host (stdlib only): the entry on stdin, the log's path in argv[1]. Under an
# exclusive flock it reads the last line, chains to it and appends; prints the line written.
_APPEND = r"""
import fcntl, hashlib, json, os, sys
record = json.loads(sys.stdin.read())
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
with os.fdopen(fd, "r+b") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    end = fh.seek(0, 2)
    tail, pos = b"", end
    while pos > 0 and tail.count(b"\n") < 2:
        step = min(4096, pos)
        pos -= step
        fh.seek(pos)
        tail = fh.read(step) + tail
    lines = tail.splitlines(keepends=True)
    record["prev"] = hashlib.sha256(lines[-1]).hexdigest() if lines else "0" * 64
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    fh.write(line.encode())
    fh.flush()
    os.fsync(fh.fileno())
sys.stdout.write(line)
"""


def append(
    executor: Executor,
    state_dir: str,
    entry: AuditEntry,
    *,
    sudo: bool = True,
    secrets: Iterable[Secret | str] = (),
    python: str = "python3",
) -> str:
    """Append ``entry`` to the host's audit log, chained to the line before; returns the line
    written."""
    if entry.key is None:
        entry = dataclasses.replace(entry, key=getattr(executor, "key_fingerprint", None))
    line = render_line(entry, secrets=secrets)
    executor.run(["mkdir", "-p", "-m", "0755", state_dir], sudo=sudo, what="audit log")
    result = executor.run(
        [python, "-c", _APPEND, audit_path(state_dir)], sudo=sudo, stdin=line, what="audit log"
    )
    return str(result.stdout)


@dataclass(frozen=True)
class ChainReport:
    entries: int  # chained entries checked
    legacy: int  # entries from before the chain began (no ``prev``)
    broken_at: int | None = None  # 1-based line number of the first break
    reason: str = ""

    @property
    def holds(self) -> bool:
        return self.broken_at is None

    def describe(self) -> str:
        if not self.holds:
            return f"audit chain broken at line {self.broken_at}: {self.reason}"
        old = f" (and {self.legacy} older entries from before the chain)" if self.legacy else ""
        return f"audit chain holds: {self.entries} entries{old}"


def check_chain(text: str) -> ChainReport:
    """Check the hash chain of a whole audit log's text."""
    raw = text.encode().splitlines(keepends=True)
    legacy = chained = 0
    previous: bytes | None = None
    for number, line in enumerate(raw, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if chained:
                return ChainReport(chained, legacy, number, "not an audit entry")
            legacy += 1
            previous = line
            continue
        if "prev" not in record:
            if chained:
                return ChainReport(chained, legacy, number, "an entry without its chain link")
            legacy += 1
            previous = line
            continue
        want = hashlib.sha256(previous).hexdigest() if previous is not None else GENESIS
        if record["prev"] != want:
            why = "it does not follow the line before it (changed, removed or inserted)"
            return ChainReport(chained, legacy, number, why)
        chained += 1
        previous = line
    return ChainReport(chained, legacy)


def verify(executor: Executor, state_dir: str, *, sudo: bool = True) -> ChainReport:
    result = executor.run(["cat", "--", audit_path(state_dir)], sudo=sudo, check=False)
    if not result.ok:
        if not executor.run(["test", "-e", audit_path(state_dir)], sudo=sudo, check=False).ok:
            return ChainReport(0, 0)
        raise RemoteCommandFailed(result, what=f"read {audit_path(state_dir)}")
    return check_chain(result.stdout)


def tail(
    executor: Executor, state_dir: str, n: int = 20, *, sudo: bool = True
) -> list[dict[str, Any]]:
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
