"""Pulling a model's weights onto the host, seen from the operator's side.

The host does the transfer itself (``deployer/remote/pull_model.py``, S3 to local disk with the
host's own credentials): the weights never pass through the operator's machine. The script is
sent on stdin to the service venv's python (``[python, "-", ARGS...]``), so the host needs no
copy of it and always runs the version the operator has; its arguments are plain words
(bucket, prefix, paths, sizes), never secrets.

This module builds that argv, turns the script's JSON lines into typed events for a progress
bar, and maps its failures to ``ModelSourceError``. The check of the S3 prefix from the
operator's machine before the host is touched is ``deployer.s3.preflight_source``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelSourceError, RemoteCommandFailed

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .config import Settings
    from .ssh import Executor

SCRIPT = Path(__file__).resolve().parent / "remote" / "pull_model.py"
MIB = 1 << 20
GIB = 1 << 30

#: What the operator is told to do about each error code the script reports.
HINTS: dict[str, str] = {
    "not_found": "check the catalog's bucket and s3_prefix (and s3.bucket in the config)",
    "access_denied": "the host's AWS credentials (instance profile) need s3:ListBucket and "
    "s3:GetObject on the model's prefix",
    "endpoint": "check s3.endpoint_url and that the host can reach S3; run again to resume",
    "changed": "the objects changed while pulling; run again to pull the new version",
    "source": "run again to resume; the finished parts are kept on the host",
    "disk": "free space under remote.models_dir (old revisions, other models) or lower "
    "policy.disk_margin_gb",
    "io": "check that remote.models_dir exists and belongs to the service user",
    "corrupt": "the bad file was removed from staging; run again to fetch it anew",
    "busy": "another pull of this model is running on the host; wait for it",
    "interrupted": "run again to resume; the finished parts are kept on the host",
}


@dataclass(frozen=True)
class PullRequest:
    """Everything the host-side script needs; all of it is safe to show and log."""

    bucket: str
    prefix: str
    models_dir: str
    name: str
    revision: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    concurrency: int = 16
    part_size: int = 64 * MIB
    disk_margin_bytes: int = 2 * GIB
    max_rate: int | None = None
    retries: int = 4
    progress_interval: float = 0.5
    read_timeout: float = 60.0
    verify_only: bool = False

    def args(self) -> list[str]:
        argv = [
            "--bucket", self.bucket,
            "--prefix", self.prefix,
            "--models-dir", self.models_dir,
            "--name", self.name,
            "--concurrency", str(self.concurrency),
            "--part-size", str(self.part_size),
            "--disk-margin-bytes", str(self.disk_margin_bytes),
            "--retries", str(self.retries),
            "--progress-interval", str(self.progress_interval),
            "--read-timeout", str(self.read_timeout),
        ]  # fmt: skip
        if self.revision:
            argv += ["--revision", self.revision]
        if self.endpoint_url:
            argv += ["--endpoint-url", self.endpoint_url]
        if self.region:
            argv += ["--region", self.region]
        if self.max_rate:
            argv += ["--max-rate", str(self.max_rate)]
        if self.verify_only:
            argv.append("--verify-only")
        return argv


def venv_python(settings: Settings) -> str:
    """The service venv's python on the host: it has boto3 (the ``server`` extra)."""
    return f"{settings.remote.service_dir}/venv/bin/python"


def pull_request(
    settings: Settings, spec: ModelSpec, *, bucket: str, revision: str | None = None, **kw: Any
) -> PullRequest:
    """The request for one catalog model under the operator's settings."""
    return PullRequest(
        bucket=settings.s3.bucket or bucket,
        prefix=spec.s3_prefix,
        models_dir=settings.remote.models_dir,
        name=spec.name,
        revision=revision or spec.revision,
        endpoint_url=settings.s3.endpoint_url,
        region=settings.s3.region,
        disk_margin_bytes=int(settings.policy.disk_margin_gb * GIB),
        read_timeout=settings.s3.pull_read_timeout_s,
        **kw,
    )


def pull_argv(python: str, request: PullRequest) -> list[str]:
    """``[python, "-", ARGS]``: the script itself goes on stdin (``script_source()``)."""
    return [python, "-", *request.args()]


def script_source() -> str:
    return SCRIPT.read_text(encoding="utf-8")


def model_path(models_dir: str, name: str, revision: str) -> str:
    return f"{models_dir}/{name}/{revision}"


# ------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class PullStarted:
    name: str
    revision: str
    files: int
    total: int
    to_fetch: int
    resumed_bytes: int
    staging: str


@dataclass(frozen=True)
class PullProgress:
    bytes: int
    total: int
    fetched: int
    rate_bps: int
    eta_s: float | None
    files_done: int
    files: int


@dataclass(frozen=True)
class PullFileVerified:
    path: str
    size: int
    verified_by: str


@dataclass(frozen=True)
class PullWarning:
    message: str


@dataclass(frozen=True)
class PullResult:
    """The ``done`` event: where the model now is and what it took."""

    status: str  # pulled | present | verified
    name: str
    revision: str
    path: str
    total: int
    files: int
    fetched_bytes: int
    resumed_bytes: int
    elapsed_s: float
    rate_bps: int
    unverified: tuple[str, ...] = ()
    message: str = ""

    @property
    def already_present(self) -> bool:
        return self.status == "present"


@dataclass(frozen=True)
class PullFailed:
    code: str
    message: str
    staging: str | None = None


PullEvent = PullStarted | PullProgress | PullFileVerified | PullWarning | PullResult | PullFailed
EventCallback = Callable[[PullEvent], None]

_EVENT_TYPES: dict[str, type] = {
    "start": PullStarted,
    "progress": PullProgress,
    "file": PullFileVerified,
    "warning": PullWarning,
    "done": PullResult,
    "error": PullFailed,
}


def parse_event(line: str) -> PullEvent | None:
    """One JSON line of the script as a typed event; None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    kind = _EVENT_TYPES.get(str(data.pop("event", "")))
    if kind is None:
        return None
    known = {f.name for f in fields(kind)}
    values = {k: v for k, v in data.items() if k in known}
    if "unverified" in values:
        values["unverified"] = tuple(values["unverified"] or ())
    try:
        return kind(**values)  # type: ignore[no-any-return]
    except TypeError:
        return None


@dataclass
class PullEventStream:
    """Feeds the script's stdout lines (``Executor.run(on_output=...)``) to a callback."""

    callback: EventCallback | None = None
    result: PullResult | None = None
    failure: PullFailed | None = None
    warnings: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        event = parse_event(line)
        if event is None:
            if line.strip():
                self.other.append(line.rstrip()[-500:])
            return
        if isinstance(event, PullResult):
            self.result = event
        elif isinstance(event, PullFailed):
            self.failure = event
        elif isinstance(event, PullWarning):
            self.warnings.append(event.message)
        if self.callback is not None:
            self.callback(event)


def failure_error(failure: PullFailed) -> ModelSourceError:
    hint = HINTS.get(failure.code)
    if failure.staging and failure.code not in ("disk", "not_found", "access_denied"):
        hint = f"{hint}; partial data kept in {failure.staging}" if hint else None
    return ModelSourceError(f"pulling the model failed: {failure.message}", hint=hint)


def run_pull(
    executor: Executor,
    request: PullRequest,
    *,
    python: str,
    on_event: EventCallback | None = None,
    sudo: bool = False,
    timeout: float | None = None,
) -> PullResult:
    """Run the pull on the host; the ``done`` event, or ModelSourceError/RemoteCommandFailed.

    The script runs as the SSH user (who owns ``models_dir`` on a prepared host); ``sudo``
    runs it as root instead, e.g. while the directory still belongs to root.
    """
    stream = PullEventStream(on_event)
    result = executor.run(
        pull_argv(python, request),
        sudo=sudo,
        check=False,
        stdin=script_source(),
        timeout=timeout,
        on_output=stream.feed,
        what=f"pull {request.name}",
    )
    if stream.result is None and stream.failure is None:
        # An executor that does not stream still returns stdout: parse it after the fact.
        for line in result.stdout.splitlines():
            stream.feed(line)
    if result.ok and stream.result is not None:
        return stream.result
    if stream.failure is not None:
        raise failure_error(stream.failure)
    raise RemoteCommandFailed(result, what=f"pull {request.name}")


# ------------------------------------------------------------------------ progress bar


__all__ = (
    "PullEvent",
    "PullEventStream",
    "PullFailed",
    "PullFileVerified",
    "PullProgress",
    "PullRequest",
    "PullResult",
    "PullStarted",
    "PullWarning",
    "parse_event",
    "pull_argv",
    "pull_request",
    "run_pull",
    "script_source",
    "venv_python",
)
