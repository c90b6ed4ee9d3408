"""Deployments kept on the host, so a failed deploy (or ``--rollback``) can restore the last one.

Under ``<state_dir>``::

    current.json            the release now running (a copy of its releases/<n>.json)
    releases/<n>.json       every recorded release, n = 1, 2, 3 ... (the last N are kept)
    releases/<n>.env        that release's service.env, 0600 as the original (it holds the key)

A release records what is needed to put it back: the model, its revision and directory, the
port, quantization, the unit file's text and the saved env file. Writes go through
``unit.write_file`` (sudo, temp name, then ``mv -T``), so ``current.json`` is never half
written.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import commands
from .unit import FileWrite, write_file

if TYPE_CHECKING:
    from .ssh import Executor

CURRENT = "current.json"
RELEASES = "releases"
_RELEASE_RE = re.compile(r"^(\d{1,9})\.json$")


@dataclass(frozen=True)
class Release:
    model: str
    revision: str
    model_path: str
    port: int
    quantization: str
    service_name: str
    unit_text: str = field(repr=False)
    number: int = 0
    time: str = ""
    operator: str = ""
    env_file: str | None = None  # the saved copy of service.env
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Release:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

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
        text = self._cat(f"{self.state_dir}/{CURRENT}")
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
        self.prune(keep)
        return saved

    def set_current(self, release: Release) -> None:
        path = f"{self.state_dir}/{CURRENT}"
        write_file(self.executor, FileWrite(path, release.to_json(), mode="0600"))

    def prune(self, keep: int) -> list[int]:
        """Remove all but the newest ``keep`` releases (never the current one)."""
        now = self.current()
        numbers = self.numbers()
        doomed = numbers[: max(0, len(numbers) - max(1, keep))]
        doomed = [n for n in doomed if now is None or n != now.number]
        if doomed:
            paths = [f"{self.dir}/{n}.{ext}" for n in doomed for ext in ("json", "env")]
            self.executor.run(commands.remove(*paths), sudo=self.sudo)
        return doomed

    def model_paths_in_use(self) -> set[str]:
        """Model directories a kept release points at: apply must not delete these."""
        paths = set()
        for number in self.numbers():
            release = self.get(number)
            if release is not None:
                paths.add(release.model_path)
        return paths
