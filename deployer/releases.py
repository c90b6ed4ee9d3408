"""Deployments kept on the host, so a failed deploy (or ``--rollback``) can restore the last one.

Under ``<state_dir>``::

    current.json            the release now running (a copy of its releases/<n>.json), 0644:
                            the unprivileged probe reads it as the host's ``DeploymentState``
    releases/<n>.json       every recorded release, n = 1, 2, 3 ... (the last N are kept)
    releases/<n>.env        that release's service.env, 0600 as the original (it holds the key)

``Releases`` is the only writer of these files, and a ``Release`` is their one schema: the
``DeploymentState`` the probe reads (model, revision, port, quantization, Flux parking, code
and lock ids) at the top level, and beside it what is needed to put the release back (the
model directory, the unit file's text, the venv and the saved env file). Writes go through
``unit.write_file`` (sudo, temp name, then ``mv -T``), so ``current.json`` is never half
written. Records written before this schema (release fields plus an ``extra`` object) are
read too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import commands
from .facts import DeploymentState
from .unit import FileWrite, write_file

if TYPE_CHECKING:
    from .ssh import Executor

#: The record of the running deployment, under ``state_dir``; the probe is told its path.
CURRENT = "current.json"
RELEASES = "releases"
_RELEASE_RE = re.compile(r"^(\d{1,9})\.json$")
#: The keys a release adds beside its ``DeploymentState``.
_RECORD_KEYS = ("model_path", "unit_text", "venv", "number", "time", "operator", "env_file")


def current_path(state_dir: str) -> str:
    return f"{state_dir.rstrip('/')}/{CURRENT}"


@dataclass(frozen=True)
class Release:
    state: DeploymentState
    model_path: str
    unit_text: str = field(repr=False)
    venv: str | None = None
    number: int = 0
    time: str = ""
    operator: str = ""
    env_file: str | None = None  # the saved copy of service.env

    @property
    def model(self) -> str:
        return self.state.model

    @property
    def revision(self) -> str:
        return self.state.revision or ""

    @property
    def port(self) -> int:
        return self.state.port

    @property
    def quantization(self) -> str:
        return self.state.quantization

    @property
    def service_name(self) -> str:
        return self.state.service or ""

    def to_json(self) -> str:
        record = {key: getattr(self, key) for key in _RECORD_KEYS}
        return json.dumps({**self.state.to_file(), **record}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Release:
        data: dict[str, Any] = json.loads(text)
        if isinstance(data.get("extra"), dict):  # the schema before DeploymentState moved in
            extra = data.pop("extra")
            data = {**data, **extra}
            data.setdefault("service", data.get("service_name"))
        record = {key: data.pop(key) for key in _RECORD_KEYS if key in data}
        data.pop("service_name", None)
        return cls(state=DeploymentState.model_validate(data), **record)

    def summary(self) -> str:
        return (
            f"#{self.number} {self.model}@{self.revision} on port {self.port} "
            f"({self.quantization}), {self.time}"
        )


class Releases:
    """The release records of one host, through an executor (sudo: the state dir is root's)."""

    def __init__(self, executor: Executor, state_dir: str, *, sudo: bool = True) -> None:
        self.executor = executor
        self.state_dir = state_dir.rstrip("/")
        self.dir = f"{self.state_dir}/{RELEASES}"
        self.sudo = sudo
        self.current_path = current_path(self.state_dir)

    def _cat(self, path: str) -> str | None:
        result = self.executor.run(["cat", "--", path], sudo=self.sudo, check=False)
        return result.stdout if result.ok else None

    def numbers(self) -> list[int]:
        result = self.executor.run(["ls", "-1", "--", self.dir], sudo=self.sudo, check=False)
        if not result.ok:
            return []
        found = (_RELEASE_RE.match(line.strip()) for line in result.stdout.splitlines())
        return sorted(int(m.group(1)) for m in found if m)

    def get(self, number: int) -> Release | None:
        text = self._cat(f"{self.dir}/{number}.json")
        return Release.from_json(text) if text else None

    def current(self) -> Release | None:
        text = self._cat(self.current_path)
        return Release.from_json(text) if text else None

    def previous(self) -> Release | None:
        """The newest release before the current one: what a rollback restores."""
        now = self.current()
        candidates = [n for n in self.numbers() if now is None or n < now.number]
        return self.get(candidates[-1]) if candidates else None

    def record(
        self,
        release: Release,
        *,
        env_source: str | None = None,
        keep: int = 3,
        operator: str = "",
    ) -> Release:
        """Save ``release`` as the next number, make it current, keep the last ``keep``."""
        number = max(self.numbers(), default=0) + 1
        env_copy = None
        self.executor.run(["mkdir", "-p", "-m", "0700", self.dir], sudo=self.sudo)
        if env_source:
            env_copy = f"{self.dir}/{number}.env"
            self.executor.run(commands.copy(env_source, env_copy), sudo=self.sudo)
        saved = replace(
            release,
            number=number,
            time=release.time or datetime.now(UTC).isoformat(timespec="seconds"),
            operator=release.operator or operator,
            env_file=env_copy,
        )
        text = saved.to_json()
        write_file(self.executor, FileWrite(f"{self.dir}/{number}.json", text, mode="0600"))
        self.set_current(saved)
        self.prune(keep, check=False)  # the release is recorded; a leftover old one is harmless
        return saved

    def set_current(self, release: Release) -> None:
        """Make ``release`` the running one. World-readable: the unprivileged probe reads it,
        and it holds no secret (the key stays in the 0600 env copy it only names)."""
        write_file(self.executor, FileWrite(self.current_path, release.to_json(), mode="0644"))

    def clear_current(self) -> None:
        """Nothing of ours runs any more (undeploy); the kept releases stay."""
        self.executor.run(commands.remove(self.current_path), sudo=self.sudo)

    def prune(self, keep: int, *, check: bool = True) -> list[int]:
        """Remove all but the newest ``keep`` releases (never the current one)."""
        now = self.current()
        numbers = self.numbers()
        doomed = numbers[: max(0, len(numbers) - max(1, keep))]
        doomed = [n for n in doomed if now is None or n != now.number]
        if doomed:
            paths = [f"{self.dir}/{n}.{ext}" for n in doomed for ext in ("json", "env")]
            self.executor.run(commands.remove(*paths), sudo=self.sudo, check=check)
        return doomed

    def model_paths_in_use(self) -> set[str]:
        """Model directories a kept release points at: apply must not delete these."""
        paths = set()
        for number in self.numbers():
            release = self.get(number)
            if release is not None:
                paths.add(release.model_path)
        return paths
