"""The systemd unit, its environment file and the discovery files, rendered from settings.

Three kinds of file end up on the host:

``/etc/systemd/system/<service_name>``
    from ``systemd/asoba-inference.service.in``: runs ``<service_dir>/venv/bin/python -m
    remote_service`` as the (non-root) service user, restarts it 10 s after a crash, caps it at
    ``service.memory_max`` / ``service.cpu_quota``, and sandboxes it as far as a CUDA process
    allows (the template says why each hardening option is on or off).
``<service_dir>/service.env`` (0600, the service user's)
    the server's settings as ``ASOBA_*`` lines, including the API key: the only place the key
    is ever written. It reaches the host on stdin, never in argv.
discovery files, for the tools that look for the service
    ``/etc/profile.d/asoba-inference.sh`` (``export MISTRAL_STATUS_URL=...``) is read by login
    shells: interactive SSH sessions, ``bash -l``, ``su -``. ``/etc/environment.d/
    90-asoba-inference.conf`` (plain ``KEY=VALUE``) is read by every systemd *user* manager
    (``systemd --user`` services); a *system* service that wants the values names the same file
    in its unit (``EnvironmentFile=-/etc/environment.d/90-asoba-inference.conf``). Neither
    reaches non-interactive ``ssh host cmd`` shells; /etc/environment (pam_env) would, but it
    is a shared file we do not rewrite, and ``systemctl set-environment`` does not survive a
    reboot and leaks into every service.

Everything is returned as text (``FileWrite``); ``write_file`` installs one through an
executor atomically (a temporary name, then ``mv -T``).
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import commands
from .errors import ConfigError, ForeignUnit
from .operator_input import within
from .redact import Secret

if TYPE_CHECKING:
    from .config import Settings
    from .ssh import Executor

TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "asoba-inference.service.in"
UNIT_DIR = "/etc/systemd/system"
ENV_FILE_NAME = "service.env"
DISCOVERY_PROFILE = "/etc/profile.d/asoba-inference.sh"
DISCOVERY_ENVIRONMENT_D = "/etc/environment.d/90-asoba-inference.conf"
DEFAULT_SHUTDOWN_TIMEOUT_S = 20
#: Home-like trees that ProtectHome= hides.
_HOME_TREES = ("/home", "/root", "/run/user")
_PLACEHOLDER_RE = re.compile(r"@([A-Z_]+)@")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN_VALUE_RE = re.compile(r"^[A-Za-z0-9_./:@%+,=-]*$")

#: ServiceEnv field -> the server's environment variable (remote_service/settings.py: every
#: field ``foo`` is ``ASOBA_FOO``). Adjust here when the server renames one.
SERVER_ENV: dict[str, str] = {
    "model_dir": "ASOBA_MODEL_DIR",
    "model_name": "ASOBA_MODEL_NAME",
    "host": "ASOBA_HOST",
    "port": "ASOBA_PORT",
    "quantization": "ASOBA_QUANTIZATION",
    "dtype": "ASOBA_DTYPE",
    "device": "ASOBA_DEVICE",
    "max_concurrent_seqs": "ASOBA_MAX_NUM_SEQS",
    "max_new_tokens": "ASOBA_MAX_NEW_TOKENS",
    "max_model_len": "ASOBA_MAX_MODEL_LEN",
    "shutdown_timeout": "ASOBA_SHUTDOWN_TIMEOUT",
    "api_key": "ASOBA_API_KEY",
    "backend": "ASOBA_BACKEND",
    "vllm_python": "ASOBA_VLLM_PYTHON",
    "gpu_memory_utilization": "ASOBA_GPU_MEMORY_UTILIZATION",
    "tensor_parallel_size": "ASOBA_TENSOR_PARALLEL_SIZE",
    "kv_cache_bytes": "ASOBA_KV_CACHE_BYTES",
    "vllm_tool_call_parser": "ASOBA_VLLM_TOOL_CALL_PARSER",
}
#: The engines the server runs (ASOBA_BACKEND).
ENGINES = ("transformers", "vllm")
#: Where a vLLM engine's workers meet: loopback ports the kernel picks from its ephemeral
#: range (Linux's default ip_local_port_range) when tensor parallelism spans processes.
VLLM_WORKER_PORTS = "tcp:32768-60999"
#: The planner's quantization names -> the server's.
QUANTIZATION: dict[str, str] = {
    "none": "none",
    "4bit": "bnb-4bit",
    "bnb-4bit": "bnb-4bit",
    "8bit": "bnb-8bit",
    "bnb-8bit": "bnb-8bit",
    "awq": "awq",
}
#: Catalog precisions -> the server's dtype (pre-quantized int4 weights load as "auto").
DTYPE: dict[str, str] = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "int4": "auto",
    "auto": "auto",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
}


# ------------------------------------------------------------------------------ service.env


@dataclass(frozen=True)
class ServiceEnv:
    """The server's settings for one deployment."""

    model_dir: str
    model_name: str
    port: int
    host: str = "0.0.0.0"  # noqa: S104 - the monitor polls the service from outside
    quantization: str = "none"
    dtype: str = "auto"
    device: str | None = None
    max_concurrent_seqs: int | None = None
    max_new_tokens: int | None = None
    max_model_len: int | None = None
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT_S
    api_key: Secret | None = None
    backend: str = "transformers"
    # vLLM only: its venv's python, the plan's share of each GPU, GPUs per model, KV budget.
    vllm_python: str | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None
    kv_cache_bytes: int | None = None
    vllm_tool_call_parser: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION:
            raise ConfigError(f"unknown quantization {self.quantization!r}")
        if self.dtype not in DTYPE:
            raise ConfigError(f"unknown dtype {self.dtype!r}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port out of range: {self.port}")
        if self.backend not in ENGINES:
            raise ConfigError(f"unknown engine {self.backend!r}")
        if self.backend == "vllm" and not self.vllm_python:
            raise ConfigError("the vllm engine needs the python of its venv")
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            raise ConfigError("api_key must be a Secret")
        for key in self.extra:
            if not _ENV_KEY_RE.fullmatch(key):
                raise ConfigError(f"not an environment variable name: {key!r}")

    def variables(self) -> dict[str, str | Secret]:
        """Variable -> value, in a stable order; unset optional values are left out."""
        values: dict[str, object] = {
            "model_dir": self.model_dir,
            "model_name": self.model_name,
            "host": self.host,
            "port": self.port,
            "quantization": QUANTIZATION[self.quantization],
            "dtype": DTYPE[self.dtype],
            "device": self.device,
            "max_concurrent_seqs": self.max_concurrent_seqs,
            "max_new_tokens": self.max_new_tokens,
            "max_model_len": self.max_model_len,
            "shutdown_timeout": self.shutdown_timeout,
            "api_key": self.api_key,
            # Left out for the server's default, so a transformers env file reads as before.
            "backend": None if self.backend == "transformers" else self.backend,
            "vllm_python": self.vllm_python,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "vllm_tool_call_parser": self.vllm_tool_call_parser,
        }
        out: dict[str, str | Secret] = {}
        for name, value in values.items():
            if value is None:
                continue
            out[SERVER_ENV[name]] = value if isinstance(value, Secret) else str(value)
        for key, value in self.extra.items():
            out[key] = value
        return out


def service_env(
    settings: Settings,
    *,
    model_dir: str,
    model_name: str,
    port: int,
    quantization: str = "none",
    dtype: str = "auto",
    api_key: Secret | None = None,
    **kw: object,
) -> ServiceEnv:
    """The ``ServiceEnv`` for a plan, with the limits from ``settings.service``."""
    return ServiceEnv(
        model_dir=model_dir,
        model_name=model_name,
        port=port,
        quantization=quantization,
        dtype=dtype,
        api_key=api_key,
        max_new_tokens=settings.service.max_new_tokens,
        **({"max_concurrent_seqs": settings.service.max_concurrent_seqs} | kw),  # type: ignore[arg-type]
    )


def quote_env_value(value: str) -> str:
    """One value in systemd EnvironmentFile syntax (also valid for POSIX shells).

    Plain words stay bare; anything else goes in double quotes with ``\\``, ``"``, ``$`` and
    backquote escaped, which systemd and sh both read back as the literal characters.
    Newlines and other control characters are refused: no value of ours needs them.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("environment values may not contain control characters or newlines")
    if value and _PLAIN_VALUE_RE.fullmatch(value):
        return value
    escaped = re.sub(r'([\\"$`])', r"\\\1", value)
    return f'"{escaped}"'


def render_env_lines(variables: Mapping[str, str | Secret]) -> Secret:
    """``KEY=VALUE`` lines; a ``Secret`` because the content may hold the API key."""
    lines = ["# Written by model-deployer; replaced on every deploy."]
    for key, value in variables.items():
        if not _ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"not an environment variable name: {key!r}")
        raw = value.reveal() if isinstance(value, Secret) else value
        lines.append(f"{key}={quote_env_value(raw)}")
    return Secret("\n".join(lines) + "\n")


def render_env_file(env: ServiceEnv) -> Secret:
    return render_env_lines(env.variables())


def parse_env_file(text: str) -> dict[str, str]:
    """Read EnvironmentFile text back as systemd does (for drift checks and tests).

    Supports what systemd accepts on one line: comments, ``KEY=value``, optional ``export``,
    double quotes with ``\\``-escapes of ``\\ " $ ` `` and single quotes taken literally.
    """
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"line {number}: not KEY=VALUE")
        rest = rest.lstrip()
        value = []
        i = 0
        while i < len(rest):
            c = rest[i]
            if c == '"':
                i += 1
                while i < len(rest) and rest[i] != '"':
                    if rest[i] == "\\" and i + 1 < len(rest) and rest[i + 1] in '\\"$`':
                        i += 1
                    value.append(rest[i])
                    i += 1
                if i >= len(rest):
                    raise ValueError(f"line {number}: unterminated double quote")
                i += 1
            elif c == "'":
                end = rest.find("'", i + 1)
                if end < 0:
                    raise ValueError(f"line {number}: unterminated single quote")
                value.append(rest[i + 1 : end])
                i = end + 1
            elif c == "\\" and i + 1 < len(rest):
                value.append(rest[i + 1])
                i += 2
            elif c.isspace():
                # Unquoted trailing whitespace ends the value, as in systemd.
                if rest[i:].strip():
                    value.append(c)
                    i += 1
                else:
                    break
            else:
                value.append(c)
                i += 1
        out[key] = "".join(value)
    return out


# --------------------------------------------------------------------------------- the unit


def unit_path(settings: Settings) -> str:
    return f"{UNIT_DIR}/{settings.remote.service_name}"


def env_file_path(settings: Settings) -> str:
    return f"{settings.remote.service_dir}/{ENV_FILE_NAME}"


def render_unit(
    settings: Settings,
    *,
    model_name: str,
    port: int = 8000,
    group: str | None = None,
    shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S,
    template: str | None = None,
    engine: str = "transformers",
) -> str:
    """The unit file text for ``settings`` (service user, paths, limits, restart delay);
    ``port`` is the only one the service may bind, and with the vLLM engine also the
    ephemeral loopback ports its workers meet on."""
    remote = settings.remote
    service = settings.service
    if remote.service_user == "root":  # config validation refuses it too; never render it
        raise ValueError("the service never runs as root")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", model_name):
        raise ValueError(f"unsafe model name for a unit file: {model_name!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    stem = remote.service_name.removesuffix(".service")
    paths = (remote.service_dir, remote.models_dir)
    values = {
        "SERVICE_NAME": remote.service_name,
        "MODEL_NAME": model_name,
        "USER": remote.service_user,
        "GROUP": group or remote.service_user,
        "SERVICE_DIR": remote.service_dir,
        "MODELS_DIR": remote.models_dir,
        "STATE_DIR": remote.state_dir,
        "SYSLOG_ID": stem,
        "CACHE_NAME": stem,
        "RESTART_SEC": str(service.restart_sec),
        "TIMEOUT_STOP_SEC": str(shutdown_timeout_s + 10),
        "MEMORY_MAX": service.memory_max,
        "CPU_QUOTA": service.cpu_quota,
        "PORT": str(port),
        "ENGINE_BIND": (
            f"SocketBindAllow={VLLM_WORKER_PORTS}"
            if engine == "vllm"
            else "# (the transformers engine runs in this process: no other port)"
        ),
        # A service or model directory under /home needs the tree visible (read-only).
        "PROTECT_HOME": "read-only" if _under_any(paths) else "yes",
    }
    text = template if template is not None else TEMPLATE.read_text(encoding="utf-8")

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"unit template: unknown placeholder @{name}@")
        return values[name]

    rendered = _PLACEHOLDER_RE.sub(fill, text)
    for name, value in values.items():
        # '%' starts a systemd specifier in paths and names (CPUQuota= takes it literally).
        if "\n" in value or ("%" in value and name != "CPU_QUOTA"):
            raise ValueError(f"unsafe value for a unit file: {value!r}")
    return rendered


def _under_any(paths: Iterable[str]) -> bool:
    return any(within(p, tree) for p in paths for tree in _HOME_TREES)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)], in order (repeated keys kept): for checks and tests."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


# ------------------------------------------------------------------------------- discovery


def discovery_variables(port: int, *, host: str = "127.0.0.1") -> dict[str, str]:
    """What other tools (the MCP server, the monitor) read to find the service."""
    return {
        "MISTRAL_STATUS_URL": f"http://localhost:{port}/status",
        "MISTRAL_FALLBACK_IP": host,
        "ASOBA_INFERENCE_PORT": str(port),
    }


def render_profile(variables: Mapping[str, str]) -> str:
    lines = ["# Written by model-deployer: where the inference service is (login shells)."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in variables.items()]
    return "\n".join(lines) + "\n"


def render_environment_d(variables: Mapping[str, str]) -> str:
    lines = ["# Written by model-deployer: where the inference service is (systemd managers)."]
    lines += [f"{key}={quote_env_value(value)}" for key, value in variables.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- file writes


@dataclass(frozen=True)
class FileWrite:
    """One file to install on the host: content goes over stdin, never into argv."""

    path: str
    content: str | Secret = field(repr=False)
    mode: str = "0644"
    owner: str = "root"
    group: str | None = None

    def temp_path(self, token: str) -> str:
        parent, _, name = self.path.rpartition("/")
        return f"{parent}/.{name}.tmp-{token}"

    def argv(self, token: str) -> list[str]:
        return commands.install_from_stdin(
            self.temp_path(token), mode=self.mode, owner=self.owner, group=self.group
        )

    def stdin(self) -> str:
        return self.content.reveal() if isinstance(self.content, Secret) else self.content


UNIT_MARKER = "rendered by model-deployer"  # in the template's first line


def foreign_unit(executor: Executor, settings: Settings) -> str | None:
    """Why ``remote.service_name`` is not this tool's to write, stop or remove; ``None`` when
    the unit is ours or does not exist yet. Read-only."""
    name = settings.remote.service_name
    shown = executor.run(
        ["systemctl", "show", "--property=LoadState,FragmentPath", "--", name], check=False
    )
    props = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    path = unit_path(settings)
    if props.get("LoadState") == "masked":
        return f"{name} is masked"
    fragment = props.get("FragmentPath", "")
    if fragment and fragment != path:
        return f"{name} is defined by {fragment}, not by this tool"
    existing = executor.run(["cat", "--", path], sudo=True, check=False)
    if existing.ok and UNIT_MARKER not in existing.stdout:
        return f"{path} was not written by this tool"
    return None


def refuse_foreign_unit(executor: Executor, settings: Settings) -> None:
    reason = foreign_unit(executor, settings)
    if reason:
        raise ForeignUnit(
            f"refusing to touch {settings.remote.service_name}: {reason}",
            hint="set remote.service_name to a unit of this tool's own (default "
            "asoba-inference.service)",
        )


def unit_files(
    settings: Settings,
    env: ServiceEnv,
    *,
    group: str | None = None,
    discovery_host: str = "127.0.0.1",
) -> list[FileWrite]:
    """The unit, its 0600 env file and the two discovery files for one deployment."""
    user = settings.remote.service_user
    discovery = discovery_variables(env.port, host=discovery_host)
    return [
        FileWrite(
            env_file_path(settings), render_env_file(env), mode="0600", owner=user, group=group
        ),
        FileWrite(
            unit_path(settings),
            render_unit(
                settings,
                model_name=env.model_name,
                port=env.port,
                group=group,
                shutdown_timeout_s=env.shutdown_timeout,
                engine=env.backend,
            ),
        ),
        FileWrite(DISCOVERY_PROFILE, render_profile(discovery)),
        FileWrite(DISCOVERY_ENVIRONMENT_D, render_environment_d(discovery)),
    ]


def write_file(executor: Executor, write: FileWrite, *, token: str | None = None) -> None:
    """Install ``write`` atomically (temp name, then ``mv -T``) with sudo."""
    token = token or uuid.uuid4().hex[:12]
    parent = write.path.rpartition("/")[0] or "/"
    executor.run(["mkdir", "-p", parent], sudo=True, what=f"create {parent}")
    try:
        executor.run(write.argv(token), sudo=True, stdin=write.stdin(), what=f"write {write.path}")
        executor.run(
            commands.move(write.temp_path(token), write.path),
            sudo=True,
            what=f"install {write.path}",
        )
    except BaseException:
        executor.run(commands.remove(write.temp_path(token)), sudo=True, check=False)
        raise
