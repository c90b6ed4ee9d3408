"""The service and engine venvs on the host, which release needs each, and pruning the rest.

A deploy never deletes a venv: the previous release's venv is what a rollback switches back
to, and a new lock or new service code builds a new one beside the old (``service_code``).
So they pile up, a vLLM venv at several GB each. ``model-deployer venvs`` lists them:

    <service_dir>/venvs/<code id>              service venvs; the live one is <service_dir>/venv
    <service_dir>/engines/<package>-<lock id>  engine venvs; a release's env file names its
                                               interpreter (ASOBA_VLLM_PYTHON)

and ``--prune`` deletes the ones neither the live release nor a kept one (``releases``) needs,
under the host lock, so no deploy is building one meanwhile. A venv left half-built by an
interrupted install (no completion marker) is needed by nobody.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from . import commands
from .host_steps import read_remote
from .operations import Confirm, prune
from .operator_input import within
from .releases import Releases
from .service_code import COMPLETE_MARKER, current_venv, engine_venv_of, engines_dir, venvs_dir
from .unit import env_file_path

if TYPE_CHECKING:
    from .config import Settings
    from .ssh import Executor

#: What the deployer names a venv directory (a code id, or an engine package and lock id).
_VENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class VenvOnDisk:
    kind: str  # "service" or "engine"
    name: str
    path: str
    size_bytes: int
    complete: bool  # the install finished (its marker is there)
    live: bool  # the running release uses it
    kept: bool  # a kept release uses it (rollback needs it)

    @property
    def prunable(self) -> bool:
        return not (self.live or self.kept)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "prunable": self.prunable}


class _Unknown(Exception):
    """An env file that should be there could not be read or parsed."""


def _engine_of(executor: Executor, env_file: str | None) -> str | None:
    if not env_file:
        return None
    text = read_remote(executor, env_file)
    if text is None:
        raise _Unknown(env_file)
    try:
        return engine_venv_of(text)
    except ValueError:
        raise _Unknown(env_file) from None


@dataclass(frozen=True)
class _Needs:
    live: set[str]
    kept: set[str]
    #: Some release's env file could not be read: every engine venv counts as kept.
    engines_unknown: bool


def _needed(executor: Executor, settings: Settings) -> _Needs:
    """The venvs the live release uses, and those the kept releases use."""
    live: set[str | None] = {current_venv(executor, settings)}
    kept: set[str | None] = set()
    unknown = False
    live_env = env_file_path(settings)
    if executor.run(commands.test_path("-e", live_env), check=False).ok:
        try:
            live.add(_engine_of(executor, live_env))
        except _Unknown:
            unknown = True
    releases = Releases(executor, settings.remote.state_dir)
    for number in releases.numbers():
        release = releases.get(number)
        if release is None:
            continue
        kept.add(release.venv)
        try:
            kept.add(_engine_of(executor, release.env_file))
        except _Unknown:
            unknown = True
    return _Needs({p for p in live if p}, {p for p in kept if p}, unknown)


def _listed(executor: Executor, parent: str) -> list[tuple[str, int, bool]]:
    """(path, bytes, complete) of every venv directory directly under ``parent``."""
    if not executor.run(commands.test_path("-d", parent), check=False).ok:
        return []
    sizes = executor.run(
        ["find", parent, "-mindepth", "1", "-maxdepth", "1", "-type", "d",
         "!", "-name", ".*", "-exec", "du", "--bytes", "--summarize", "--", "{}", "+"],
        sudo=True,
        check=False,
    )  # fmt: skip
    markers = executor.run(
        ["find", parent, "-mindepth", "2", "-maxdepth", "2", "-name", COMPLETE_MARKER],
        sudo=True,
        check=False,
    )
    complete = {str(PurePosixPath(line).parent) for line in markers.stdout.splitlines()}
    found = []
    for line in sizes.stdout.splitlines():
        size, _, path = line.partition("\t")
        name = PurePosixPath(path).name
        if size.isdigit() and within(path, parent) and _VENV_NAME.match(name):
            found.append((path, int(size), path in complete))
    return found


def venvs_on_disk(executor: Executor, settings: Settings) -> list[VenvOnDisk]:
    """Every service and engine venv under ``service_dir``: size, and who needs it."""
    needs = _needed(executor, settings)
    found = []
    for kind, parent in (("service", venvs_dir(settings)), ("engine", engines_dir(settings))):
        for path, size, complete in _listed(executor, parent):
            found.append(
                VenvOnDisk(
                    kind=kind,
                    name=PurePosixPath(path).name,
                    path=path,
                    size_bytes=size,
                    complete=complete,
                    live=path in needs.live,
                    kept=path in needs.kept or (kind == "engine" and needs.engines_unknown),
                )
            )
    return sorted(found, key=lambda v: (v.kind != "service", v.name))


def prune_venvs(
    executor: Executor,
    settings: Settings,
    *,
    lock_wait_s: float = 0.0,
    confirm: Confirm | None = None,
) -> list[VenvOnDisk]:
    """Delete the venvs neither the live release nor a kept one needs (after ``confirm``);
    returns what was deleted."""
    return prune(
        executor,
        settings,
        "venvs --prune",
        lambda: [v for v in venvs_on_disk(executor, settings) if v.prunable],
        lock_wait_s=lock_wait_s,
        confirm=confirm,
    )
