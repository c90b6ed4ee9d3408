"""The errors the operator can see.

Every failure the CLI reports is one of these; anything else is a bug and gets a traceback
only with ``--debug`` (or ``MODEL_DEPLOYER_DEBUG=1``)::

    DeployError                       exit 1 unless noted
    ├── ConfigError                   bad config file, flag or environment override (exit 2)
    ├── CatalogError                  bad catalog file, unknown model name (exit 2)
    ├── ConnectError                  the host could not be reached or refused us (exit 3)
    │   ├── HostKeyError              unknown or changed SSH host key (never auto-accepted)
    │   └── AuthError                 key authentication failed
    ├── RemoteCommandFailed           a command on the host exited non-zero (keeps the result)
    ├── ProbeError                    the host probe answered something unreadable
    ├── ModelSourceError              S3 objects missing, unreadable or access denied
    ├── PlanRefused                   nothing fits; the plan carries the numbers (exit 4)
    ├── PlanOutdated                  the host changed since the plan was made (exit 4)
    ├── LockHeld                      another deploy holds the host lock (exit 5)
    └── HealthCheckTimeout            the service did not become healthy in time
"""

from __future__ import annotations

from dataclasses import dataclass


class DeployError(Exception):
    """Base of all errors shown to the operator as one line."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(DeployError):
    exit_code = 2


class CatalogError(DeployError):
    exit_code = 2


class ConnectError(DeployError):
    exit_code = 3


class HostKeyError(ConnectError):
    def __init__(self, message: str, *, fingerprint: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.fingerprint = fingerprint


class AuthError(ConnectError):
    pass


@dataclass(frozen=True)
class CommandResult:
    """What one remote command did."""

    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def stderr_tail(self, lines: int = 5) -> str:
        return "\n".join(self.stderr.strip().splitlines()[-lines:])


class RemoteCommandFailed(DeployError):
    def __init__(self, result: CommandResult, *, what: str | None = None) -> None:
        tail = result.stderr_tail() or result.stdout.strip()[-400:]
        label = what or result.command
        detail = f": {tail}" if tail else ""
        super().__init__(f"{label} failed (exit {result.exit_code}){detail}")
        self.result = result


class ProbeError(DeployError):
    pass


class ModelSourceError(DeployError):
    pass


class PlanRefused(DeployError):
    exit_code = 4


class PlanOutdated(DeployError):
    exit_code = 4


class LockHeld(DeployError):
    exit_code = 5


class ForeignUnit(DeployError):
    """The configured service name is a unit this tool did not make: never write, stop or
    remove it."""

    exit_code = 2


class HealthCheckTimeout(DeployError):
    pass


class DeployFailed(DeployError):
    """A deploy step failed and the steps done before it were undone (``undone``, newest
    first); ``undo_errors`` name any undo that failed too; ``journal`` is the service's last
    log lines, for the operator to read."""

    def __init__(
        self,
        message: str,
        *,
        step: str,
        undone: list[str],
        journal: str = "",
        undo_errors: list[tuple[str, str]] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.step = step
        self.undone = undone
        self.journal = journal
        self.undo_errors = undo_errors or []
