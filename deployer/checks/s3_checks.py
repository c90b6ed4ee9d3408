"""The ``s3`` group: the operator's credentials, the bucket and every selected model's prefix
(from this machine), and the host's own credentials and reach (from the host's answer: the
host does the pull)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .report import CheckResult, Options, fail, not_checked, ok, one_line, warn

if TYPE_CHECKING:
    from ..catalog import ModelSpec
    from ..config import Settings
    from ..s3 import S3Failure
    from .config_checks import Loaded
    from .host_spec import HostAnswer

#: How the checks reach S3: ``settings -> (boto3 session, s3 client)``.
S3Factory = Callable[["Settings"], tuple[Any, Any]]
S3_WORKERS = 8  # prefixes listed at once


def make_s3(settings: Settings) -> tuple[Any, Any]:
    """The operator's boto3 session (standard credential chain) and S3 client."""
    from .. import s3

    return s3.session_and_client(settings.s3)


def check_operator_credentials(session: Any) -> CheckResult:
    started = time.monotonic()
    creds = session.get_credentials()
    elapsed = time.monotonic() - started
    if creds is None:
        return fail(
            "s3.credentials",
            "no AWS credentials on this machine",
            "configure credentials (aws configure, AWS_PROFILE or environment variables)",
            elapsed,
        )
    profile = session.profile_name
    return ok("s3.credentials", f"operator: {creds.method} (profile {profile})", elapsed)


def check_bucket(client: Any, bucket: str, endpoint: str) -> CheckResult:
    started = time.monotonic()
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        from ..s3 import classify, error_text

        remedy = _bucket_remedy(classify(exc))
        value = f"s3://{bucket} at {endpoint}: {error_text(exc)}"
        return fail("s3.bucket", value, remedy, time.monotonic() - started)
    return ok("s3.bucket", f"s3://{bucket} reachable at {endpoint}", time.monotonic() - started)


def _bucket_remedy(failure: S3Failure | None) -> str:
    kind = failure.kind if failure is not None else "unreachable"
    if kind == "no_credentials":
        return "configure AWS credentials for the operator (see s3.credentials)"
    if kind in ("no_bucket", "not_found"):
        return "check the catalog's bucket (or s3.bucket in the config)"
    if kind in ("denied", "refused"):
        return "the credentials need s3:ListBucket on the bucket"
    return "check s3.endpoint_url and that S3 is reachable from this machine"


def prefix_present(client: Any, bucket: str, prefix: str) -> bool:
    page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=20)
    return any(not item["Key"].endswith("/") for item in page.get("Contents", []))


def check_models(
    client: Any, bucket: str, specs: Sequence[ModelSpec], *, explicit: bool
) -> CheckResult:
    """Every selected model's prefix holds objects. Missing: warn for the whole catalog,
    fail when the operator named the models."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(S3_WORKERS, max(len(specs), 1))) as pool:
        found = list(pool.map(lambda s: prefix_present(client, bucket, s.s3_prefix), specs))
    elapsed = time.monotonic() - started
    missing = [spec for spec, present in zip(specs, found, strict=True) if not present]
    value = f"{len(specs) - len(missing)}/{len(specs)} model prefixes present in s3://{bucket}"
    if not missing:
        return ok("s3.models", value, elapsed)
    shown = ", ".join(f"{s.name} ({s.s3_prefix})" for s in missing)
    remedy = (
        f"upload them (scripts/upload_model.py DIR s3://{bucket}/PREFIX) or check only the "
        "models you deploy with --models"
    )
    if explicit:
        return fail("s3.models", f"{value}; missing: {shown}", remedy, elapsed)
    remedy += " (a warning for the whole catalog; --strict fails on it)"
    return warn("s3.models", f"{value}; missing: {shown}", remedy, elapsed)


def operator_s3_checks(
    loaded: Loaded, options: Options, s3_factory: S3Factory
) -> list[CheckResult]:
    settings = loaded.settings
    assert settings is not None
    bucket = settings.s3.bucket or (loaded.catalog.bucket if loaded.catalog else None)
    session, client = s3_factory(settings)
    rows = [check_operator_credentials(session)]
    if bucket is None:
        reason = "config.catalog failed"
        return rows + not_checked(("s3.bucket", "s3.models"), reason, "fix the catalog first")
    rows.append(check_bucket(client, bucket, settings.s3.endpoint_url or "AWS"))
    if rows[-1].status == "fail":
        return rows + not_checked(("s3.models",), "the bucket is not reachable", "see s3.bucket")
    if loaded.catalog is None:
        reason = "config.catalog failed"
        return rows + not_checked(("s3.models",), reason, "fix the catalog or --models first")
    rows.append(check_models(client, bucket, loaded.specs, explicit=options.models is not None))
    return rows


def check_host_s3(answer: HostAnswer, settings: Settings) -> list[CheckResult]:
    aws = answer.data.get("aws") or {}
    user = aws.get("user") or settings.host.user
    status, source = aws.get("status"), aws.get("source")
    where = f"~{user}/.aws/credentials"
    if status == "found":
        creds = ok("s3.host_credentials", f"host ({user}): {source}")
    elif status == "indirect":
        creds = warn(
            "s3.host_credentials",
            f"host ({user}): {source}; cannot resolve it without boto3 on the host",
            "fine if that profile works; otherwise attach an instance profile or fill " + where,
        )
    else:
        detail = aws.get("error") or aws.get("detail") or "none in the environment, "
        creds = fail(
            "s3.host_credentials",
            f"host ({user}): no AWS credentials found ({one_line(str(detail), 120)} "
            "shared files or instance profile)",
            f"attach an instance profile with s3:GetObject/ListBucket, or write {where}",
        )
    return [creds, _host_reach(aws.get("endpoint"))]


def _host_reach(endpoint: Mapping[str, Any] | None) -> CheckResult:
    name = "s3.host_reach"
    if not endpoint:
        return fail(name, "not measured", "see the s3.bucket check (no bucket)")
    if endpoint.get("reachable"):
        return ok(name, f"host reaches {endpoint.get('url')} (HTTP {endpoint.get('http_status')})")
    return fail(
        name,
        f"host cannot reach {endpoint.get('url')}: {endpoint.get('error')}",
        "check s3.endpoint_url and the host's network (routes, security group, proxy)",
    )
