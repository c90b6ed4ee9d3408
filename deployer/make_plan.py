"""Making a plan: the core the CLI calls.

``make_plan`` validates the model name against the catalog before anything opens, then
measures the host (one SSH command) while it reads the model's metadata from S3 (a few ranged
GETs) in parallel, estimates, and hands plain data to the pure planner. It takes an executor
and a metadata source, so tests give it fakes; ``open_host`` and ``s3_metadata`` make the
real ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import s3
from .catalog import Catalog, ModelSpec
from .config import Settings
from .errors import ConfigError
from .estimate import Estimate, estimate
from .facts import HostFacts
from .model_meta import MetadataSource, ModelMeta
from .planner import Plan, PlanFlags, plan_deployment, with_code
from .probe import inspect_host
from .service_code import code_id, lock_hash
from .ssh import Executor, SSHHost


@dataclass
class PlanResult:
    plan: Plan
    facts: HostFacts
    estimates: dict[str, Estimate]
    metas: dict[str, ModelMeta]
    timings: dict[str, float] = field(default_factory=dict)


def open_host(settings: Settings, *, trust_new_host_key: bool = False) -> SSHHost:
    """The real executor: one SSH connection to ``settings.host`` (opened on first use).

    A key file that is missing or readable by others is a config error here, before any
    connection is tried (ssh would refuse it and the failure would read "cannot reach")."""
    settings.require_host()
    key = settings.host.key_file
    if key is not None:
        if not key.is_file():
            raise ConfigError(f"host.key_file: {key} does not exist")
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"host.key_file: {key} is mode {mode:04o}; a private key must be readable by "
                f"its owner only",
                hint=f"chmod 600 {key}",
            )
    return SSHHost(settings.host, trust_new_host_key=trust_new_host_key)


def s3_metadata(settings: Settings, catalog: Catalog) -> s3.S3MetadataReader:
    """The real metadata source: the catalog's bucket (or ``s3.bucket``) through boto3."""
    return s3.S3MetadataReader(
        lambda: s3.client_for(settings.s3), settings.s3.bucket or catalog.bucket
    )


def specs_to_read(spec: ModelSpec, catalog: Catalog) -> list[ModelSpec]:
    """The model, and its AWQ variant when the catalog names one."""
    variant = catalog.awq_variant_of(spec)
    return [spec, variant] if variant is not None else [spec]


def read_metas(specs: list[ModelSpec], source: MetadataSource) -> dict[str, ModelMeta]:
    if len(specs) == 1:
        return {specs[0].name: source.read(specs[0])}
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        return dict(zip([s.name for s in specs], pool.map(source.read, specs), strict=True))


def estimates_for(
    metas: Mapping[str, ModelMeta], catalog: Catalog, settings: Settings
) -> dict[str, Estimate]:
    return {
        name: estimate(meta, catalog.models[name], settings.policy) for name, meta in metas.items()
    }


def make_plan(
    name: str,
    *,
    settings: Settings,
    catalog: Catalog,
    executor: Executor,
    metadata: MetadataSource,
    flags: PlanFlags | None = None,
) -> PlanResult:
    """Plan the deployment of catalog entry ``name``. Changes nothing anywhere.

    Raises ``CatalogError`` (unknown name, before connecting), ``ConnectError``/``AuthError``
    (host unreachable), ``ProbeError``. S3 problems do not raise: the estimate falls back to
    the catalog's figures and the plan says so.
    """
    spec = catalog.get(name)
    settings.require_host()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        metas_future = pool.submit(read_metas, specs_to_read(spec, catalog), metadata)
        facts = inspect_host(executor, settings.remote)
        timings["probe_s"] = time.perf_counter() - started
        metas = metas_future.result()
    timings["inputs_s"] = time.perf_counter() - started
    estimates = estimates_for(metas, catalog, settings)
    plan = plan_deployment(spec, catalog, estimates, facts, settings, flags)
    plan = with_code(plan, code_id(), lock_hash())
    timings["total_s"] = time.perf_counter() - started
    return PlanResult(plan=plan, facts=facts, estimates=estimates, metas=metas, timings=timings)
