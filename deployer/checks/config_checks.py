"""The ``config`` group: the config file, the SSH key file, the catalog and ``--models``.

Runs first, on the operator's machine: every other group stands on the settings it loads.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..operator_input import did_you_mean
from .report import ROWS, CheckResult, Options, fail, not_checked, ok, one_line, warn

if TYPE_CHECKING:
    from ..catalog import Catalog, ModelSpec
    from ..config import Settings


@dataclass
class Loaded:
    """What the config stage produced for the other checks."""

    settings: Settings | None = None
    catalog: Catalog | None = None
    specs: list[ModelSpec] = field(default_factory=list)
    results: list[CheckResult] = field(default_factory=list)

    def shown(self, groups: frozenset[str]) -> list[CheckResult]:
        """The config rows to report: the selected ones, and a failure others depend on."""
        needed = {"config"} if self.settings is None else set()
        if self.settings is not None and "s3" in groups:
            needed.add("config.catalog")
        return [
            r
            for r in self.results
            if r.group in groups or (r.name in needed and r.status == "fail")
        ]


def check_settings(
    options: Options, environ: Mapping[str, str]
) -> tuple[CheckResult, Settings | None]:
    from ..config import load_settings
    from ..errors import ConfigError

    started = time.monotonic()
    try:
        settings = load_settings(options.config_path, environ=environ)
        address = settings.require_host()
    except ConfigError as exc:
        remedy = exc.hint or "fix the config file (--config, $MODEL_DEPLOYER_CONFIG)"
        return fail("config", one_line(exc.message), remedy, time.monotonic() - started), None
    host = settings.host
    value = f"{settings.source}: {host.user}@{address}:{host.port}"
    elapsed = time.monotonic() - started
    if settings.source == "defaults":
        remedy = "write a config file (--config or $MODEL_DEPLOYER_CONFIG) to pin the settings"
        return warn("config", f"no config file; {value} from the environment", remedy), settings
    return ok("config", value, elapsed), settings


def check_key_file(path: Path | None, environ: Mapping[str, str]) -> CheckResult:
    """The SSH private key: present, a regular file, readable, no group/other permissions."""
    name = "config.key_file"
    if path is None:
        if environ.get("SSH_AUTH_SOCK"):
            return ok(name, "no host.key_file: keys come from the ssh-agent")
        return fail(
            name, "no host.key_file and no ssh-agent", "set host.key_file to the private key"
        )
    try:
        st = path.stat()
    except FileNotFoundError:
        return fail(name, f"{path}: no such file", "set host.key_file to an existing private key")
    except OSError as exc:
        return fail(name, f"{path}: {exc.strerror}", "check the path and its permissions")
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return fail(name, f"{path}: not a regular file", "set host.key_file to the private key")
    if mode & 0o077:
        return fail(
            name,
            f"{path}: mode {mode:04o}, group/other can access it",
            f"chmod 600 {path}",
        )
    if not os.access(path, os.R_OK):
        return fail(name, f"{path}: not readable by this user", f"chown $USER {path}")
    return ok(name, f"{path} (mode {mode:04o})")


def check_catalog(
    settings: Settings, options: Options
) -> tuple[CheckResult, Catalog | None, list[ModelSpec]]:
    from ..catalog import load_catalog
    from ..errors import CatalogError

    try:
        catalog = load_catalog(settings.catalog)
    except CatalogError as exc:
        return fail("config.catalog", one_line(exc.message), "fix the catalog file"), None, []
    names = options.models or tuple(catalog.models)
    unknown = [n for n in names if n not in catalog.models]
    if unknown:
        hint = did_you_mean(unknown[0], catalog.models)
        value = f"unknown model(s) in --models: {', '.join(unknown)}{hint}"
        return fail("config.catalog", value, "`deploy-model --list` shows the catalog"), None, []
    specs = [catalog.models[n] for n in names]
    scope = "selected" if options.models else "in the catalog"
    value = f"{catalog.source}: {len(specs)} model(s) {scope}, bucket {catalog.bucket}"
    return ok("config.catalog", value), catalog, specs


def load_config(options: Options, environ: Mapping[str, str]) -> Loaded:
    loaded = Loaded()
    result, loaded.settings = check_settings(options, environ)
    loaded.results.append(result)
    if loaded.settings is None:
        loaded.results += not_checked(ROWS["config"][1:], "config failed", "fix the config first")
        return loaded
    loaded.results.append(check_key_file(loaded.settings.host.key_file, environ))
    catalog_result, loaded.catalog, loaded.specs = check_catalog(loaded.settings, options)
    loaded.results.append(catalog_result)
    return loaded
