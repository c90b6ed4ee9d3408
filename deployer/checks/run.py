"""The entry point: load the config, then run the host's checks and the operator's S3 checks
side by side, and put every row in the documented order."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .config_checks import load_config
from .host_checks import HOST_GROUPS, HostFactory, host_checks, host_rows
from .report import GROUPS, ROWS, CheckResult, Options, Report, guarded, not_checked, ordered
from .s3_checks import S3Factory, make_s3, operator_s3_checks

if TYPE_CHECKING:
    from ..config import Settings
    from ..ssh import Executor


def default_host_factory(settings: Settings, trust_new_host_key: bool) -> Executor:
    """The real host: one SSH connection (``deployer.make_plan.open_host``)."""
    from ..make_plan import open_host

    return open_host(settings, trust_new_host_key=trust_new_host_key)


def run_checks(
    options: Options,
    *,
    environ: Mapping[str, str] | None = None,
    host_factory: HostFactory = default_host_factory,
    s3_factory: S3Factory = make_s3,
) -> Report:
    """Run the selected checks; never raises for a failing check (``debug`` aside)."""
    started = time.monotonic()
    environ = os.environ if environ is None else environ
    loaded = load_config(options, environ)
    groups = options.only
    rows = loaded.shown(groups)
    if loaded.settings is None:
        rest = [r for g in GROUPS if g in groups and g != "config" for r in ROWS[g]]
        rows += not_checked(rest, "config failed", "fix the config first")
        return Report(ordered(rows), options.strict, time.monotonic() - started)

    def on_host() -> list[CheckResult]:
        return host_checks(loaded, options, groups, host_factory)

    def on_s3() -> list[CheckResult]:
        return operator_s3_checks(loaded, options, s3_factory)

    work: list[tuple[list[str], Callable[[], list[CheckResult]]]] = []
    if groups & HOST_GROUPS:
        work.append((host_rows(groups), on_host))
    if "s3" in groups:
        work.append((["s3.credentials", "s3.bucket", "s3.models"], on_s3))
    # The host (SSH) and the operator's S3 calls overlap: neither waits for the other.
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(guarded, names, job, debug=options.debug) for names, job in work]
        for job in jobs:
            rows += job.result()
    return Report(ordered(rows), options.strict, time.monotonic() - started)
