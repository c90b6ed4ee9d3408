"""The side effects the CLIs reach the world through, in one place.

Each CLI takes its ``Core`` from Click's context object (``ctx.obj``); ``Core()`` is the real
one. Tests pass their own (``CliRunner().invoke(main, args, obj=Core(open_host=fake, ...))``),
so no test has to patch a module attribute to reach the code behind a command.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .apply import Deployment, SourceCheck
    from .catalog import Catalog
    from .checks import HostFactory, Options, Report
    from .config import Settings
    from .model_meta import MetadataSource
    from .ssh import Executor

CACHE_ENV = "MODEL_DEPLOYER_CACHE"


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


def _check_source(settings: Settings) -> SourceCheck:
    from .s3 import preflight_source

    def check(bucket: str, prefix: str) -> None:
        preflight_source(
            bucket, prefix, region=settings.s3.region, endpoint_url=settings.s3.endpoint_url
        )

    return check


def wheel_cache() -> Path:
    """Where service wheels are built once per code id (``$MODEL_DEPLOYER_CACHE/wheels``)."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "model-deployer")
    return Path(root) / "wheels"


def _build_code(ident: str) -> Path:
    from .service_code import build_wheel

    return build_wheel(wheel_cache(), ident)


def _deployment(**kwargs: Any) -> Deployment:
    from .apply import Deployment

    return Deployment(**kwargs)


def _code_id() -> str:
    from .service_code import code_id

    return code_id()


def _run_checks(options: Options, *, host_factory: HostFactory) -> Report:
    from .checks import run_checks

    return run_checks(options, host_factory=host_factory)


@dataclass(frozen=True)
class Core:
    """How a command connects to the host, reads and checks S3, builds the service code it
    installs, and runs ``validate-components``' checks (the defaults are the real ones)."""

    open_host: OpenHost = _open_host
    open_metadata: OpenMetadata = _open_metadata
    check_source: Callable[[Settings], SourceCheck] = _check_source
    build_code: Callable[[str], Path] = _build_code
    code_id: Callable[[], str] = _code_id
    #: Makes the ``deployer.apply.Deployment`` that applies a plan (keyword arguments).
    deployment: Callable[..., Deployment] = _deployment
    run_checks: RunChecks = _run_checks


def core_of(obj: Any) -> Core:
    """The ``Core`` a command was given (Click's ``ctx.obj``), else the real one."""
    return obj if isinstance(obj, Core) else Core()
