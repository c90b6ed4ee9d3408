"""The side effects the CLIs reach the world through, in one place.

Each CLI takes its ``Core`` from Click's context object (``ctx.obj``); ``Core()`` is the real
one. Tests pass their own (``CliRunner().invoke(main, args, obj=Core(open_host=fake, ...))``),
so no test has to patch a module attribute to reach the code behind a command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .catalog import Catalog
    from .checks import HostFactory, Options, Report
    from .config import Settings
    from .model_meta import MetadataSource
    from .ssh import Executor


class OpenHost(Protocol):
    def __call__(self, settings: Settings, *, trust_new_host_key: bool) -> Executor: ...


class OpenMetadata(Protocol):
    def __call__(self, settings: Settings, catalog: Catalog) -> MetadataSource: ...


class RunChecks(Protocol):
    def __call__(self, options: Options, *, host_factory: HostFactory) -> Report: ...


def _open_host(settings: Settings, *, trust_new_host_key: bool) -> Executor:
    from .make_plan import open_host

    return open_host(settings, trust_new_host_key=trust_new_host_key)


def _open_metadata(settings: Settings, catalog: Catalog) -> MetadataSource:
    from .make_plan import s3_metadata

    return s3_metadata(settings, catalog)


def _run_checks(options: Options, *, host_factory: HostFactory) -> Report:
    from .checks import run_checks

    return run_checks(options, host_factory=host_factory)


@dataclass(frozen=True)
class Core:
    """How a command connects to the host and reads S3, and what runs ``validate-components``'
    checks (the defaults are the real ones)."""

    open_host: OpenHost = _open_host
    open_metadata: OpenMetadata = _open_metadata
    run_checks: RunChecks = _run_checks


def core_of(obj: Any) -> Core:
    """The ``Core`` a command was given (Click's ``ctx.obj``), else the real one."""
    return obj if isinstance(obj, Core) else Core()
