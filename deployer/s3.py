"""Everything the operator's machine does with S3: the one client, what its errors mean, the
source preflight before a deploy, and reading model metadata with ranged GETs.

One client factory (``make_client``) with one botocore ``Config`` (``CLIENT_CONFIG``) serves
the planner's metadata reads, the deploy's source preflight and ``validate-components``:

* ``connect_timeout`` 5 s: an S3 endpoint (or S3-compatible server on the LAN) that has not
  accepted a TCP connection by then is down or filtered; waiting longer only delays the
  answer the operator gets anyway.
* ``read_timeout`` 15 s: every call made here is small (a listing page, a HEAD, a ranged GET
  of at most 64 KiB, or a JSON file of a few MiB at most), so a stall this long is a fault.
* ``retries`` standard mode, 2 attempts in all: one retry rides out a throttle or a dropped
  connection; more would turn a stopped endpoint into minutes of waiting before the plan
  falls back to the catalog's figures or the check reports the failure.
* ``max_pool_connections`` 16: the metadata reader fetches up to 8 headers at once per model
  and plans read a model and its AWQ variant in parallel.

Credentials come from boto3's standard chain (environment, shared files, instance role);
they are never passed in and never appear in a message: ``classify`` builds its text from
the S3 error code and message only and scrubs anything shaped like a key.

boto3 and botocore are imported when a client is made or an error classified, never at
import time, so the CLIs start fast.

The host pulls the weights itself with its own boto3 (``deployer/remote/pull_model.py``);
that script runs on the host and keeps its own client settings for long transfers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import ModelSourceError
from .model_meta import (
    CONFIG_NAME,
    HEADER_PROBE_BYTES,
    INDEX_NAME,
    MAX_JSON_BYTES,
    ModelConfig,
    ModelMeta,
    TensorInfo,
    catalog_meta,
    header_length,
    parse_config,
    parse_header,
    summarize_tensors,
    weight_files,
)
from .pull import HINTS
from .redact import Redactor

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .config import S3Config

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 15
TOTAL_ATTEMPTS = 2
POOL_CONNECTIONS = 16
METADATA_WORKERS = 8

#: The hints the host's pull gives for the same failures.
NOT_FOUND_HINT = HINTS["not_found"]
ENDPOINT_HINT = HINTS["endpoint"]


# ------------------------------------------------------------------------------ client


def client_config() -> Any:
    """The botocore ``Config`` of every operator-side client (see the module doc)."""
    from botocore.config import Config

    return Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"total_max_attempts": TOTAL_ATTEMPTS, "mode": "standard"},
        max_pool_connections=POOL_CONNECTIONS,
    )


def new_session() -> Any:
    """A boto3 session over the standard credential chain."""
    import boto3  # lazy: keeps `--help` fast

    return boto3.session.Session()


def make_client(
    region: str | None = None, endpoint_url: str | None = None, *, session: Any = None
) -> Any:
    """The S3 client: ``endpoint_url`` and ``region`` from settings, one ``Config``."""
    session = session if session is not None else new_session()
    return session.client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=client_config()
    )


def client_for(s3: S3Config) -> Any:
    """The client for the ``[s3]`` settings."""
    return make_client(s3.region, s3.endpoint_url)


def session_and_client(s3: S3Config) -> tuple[Any, Any]:
    """A session (to ask which credentials it found) and the client made from it."""
    session = new_session()
    return session, make_client(s3.region, s3.endpoint_url, session=session)


# ------------------------------------------------------------------------------ errors


FailureKind = Literal[
    "no_credentials", "no_bucket", "not_found", "denied", "refused", "unreachable"
]
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId"})
_REDACTOR = Redactor()


@dataclass(frozen=True)
class S3Failure:
    """What went wrong with an S3 call, in the project's terms.

    ``kind``: ``no_credentials`` (none on this machine), ``no_bucket``, ``not_found`` (key or
    prefix), ``denied``, ``refused`` (S3 answered with another error), ``unreachable`` (no
    answer: endpoint, network, timeouts). ``code`` is S3's error code or HTTP status ("" when
    S3 did not answer); ``text`` is one line, safe to show.
    """

    kind: FailureKind
    code: str
    text: str


def error_text(exc: BaseException, limit: int = 200) -> str:
    """One safe line for any exception an S3 call raised: ``CODE: message`` when S3 answered."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = f"{error.get('Code') or status}: {error.get('Message') or 'S3 error'}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(_REDACTOR.text(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def classify(exc: BaseException) -> S3Failure | None:
    """The ``S3Failure`` a botocore/boto3 exception means; None for any other exception."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return S3Failure("no_credentials", "", "no AWS credentials on this machine")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        kind: FailureKind = "refused"
        if code == "NoSuchBucket":
            kind = "no_bucket"
        elif code in DENIED_CODES or status == 403:
            kind = "denied"
        elif code in NOT_FOUND_CODES or status == 404:
            kind = "not_found"
        return S3Failure(kind, code or str(status or ""), error_text(exc))
    if isinstance(exc, BotoCoreError):
        return S3Failure("unreachable", "", error_text(exc))
    return None


# ------------------------------------------------------------------------------ preflight


@dataclass(frozen=True)
class SourceSummary:
    bucket: str
    prefix: str
    objects: int
    total_bytes: int

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def source_error(failure: S3Failure, url: str) -> ModelSourceError:
    """The deploy's error for a source that cannot be checked or read."""
    if failure.kind == "no_credentials":
        return ModelSourceError(
            f"cannot check {url}: no AWS credentials on this machine",
            hint="configure AWS credentials (or a profile) for the operator, or skip the check",
        )
    if failure.kind == "no_bucket":
        return ModelSourceError(f"{url}: the bucket does not exist", hint=NOT_FOUND_HINT)
    if failure.kind == "denied":
        return ModelSourceError(
            f"{url}: access denied ({failure.code})",
            hint="the credentials need s3:ListBucket and s3:GetObject on the prefix",
        )
    if failure.kind == "not_found":
        return ModelSourceError(f"{url}: not found ({failure.code})", hint=NOT_FOUND_HINT)
    if failure.kind == "refused":
        return ModelSourceError(f"{url}: S3 error {failure.code}")
    return ModelSourceError(f"cannot check {url}: {failure.text}", hint=ENDPOINT_HINT)


def preflight_source(
    bucket: str,
    prefix: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    client: Any = None,
) -> SourceSummary:
    """Check, from the operator's machine, that ``s3://bucket/prefix`` holds readable objects.

    Lists the prefix (s3:ListBucket) and HEADs its first object (s3:GetObject). Missing,
    empty or denied raises ``ModelSourceError`` naming the bucket and prefix. The host pulls
    with its own credentials; this only catches a wrong catalog entry before anything changes.
    """
    url = f"s3://{bucket}/{prefix}"
    s3 = client if client is not None else make_client(region, endpoint_url)
    count = 0
    total = 0
    first: str | None = None
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue
                count += 1
                total += int(item["Size"])
                first = first or item["Key"]
        if first is None:
            raise ModelSourceError(f"no objects under {url}", hint=NOT_FOUND_HINT)
        s3.head_object(Bucket=bucket, Key=first)
    except ModelSourceError:
        raise
    except Exception as exc:
        failure = classify(exc)
        if failure is None:
            raise
        raise source_error(failure, url) from None
    return SourceSummary(bucket, prefix, count, total)


# ------------------------------------------------------------------------------ metadata


class WeightsNotFound(ModelSourceError):
    """S3 answered, and the model's prefix holds no weights."""


class S3MetadataReader:
    """Reads ``ModelMeta`` for catalog entries from one bucket (see ``deployer.model_meta``).

    ``client`` is a boto3 S3 client, or a function making one: then it is made on first use,
    on the thread that reads, so importing boto3 overlaps the SSH probe.
    """

    def __init__(
        self,
        client: Any | Callable[[], Any],
        bucket: str,
        *,
        max_workers: int = METADATA_WORKERS,
    ) -> None:
        self._client = None if callable(client) and not hasattr(client, "get_object") else client
        self._factory = client if self._client is None else None
        self._lock = threading.Lock()
        self.bucket = bucket
        self.max_workers = max_workers

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                assert self._factory is not None
                self._client = self._factory()
            return self._client

    def location(self, spec: ModelSpec) -> str:
        return f"s3://{self.bucket}/{spec.s3_prefix}"

    def read(self, spec: ModelSpec) -> ModelMeta:
        """Metadata from S3, or the catalog's figures with a note when S3 cannot be read."""
        try:
            return self.read_s3(spec)
        except ModelSourceError as exc:
            return catalog_meta(
                spec,
                self.location(spec),
                f"metadata not read from S3: {exc}",
                exists=False if isinstance(exc, WeightsNotFound) else None,
            )

    # -- S3 calls ------------------------------------------------------------------------

    def _list(self, prefix: str) -> dict[str, int]:
        sizes: dict[str, int] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.client.list_objects_v2(**kwargs)
            for item in page.get("Contents", []):
                sizes[item["Key"]] = int(item["Size"])
            if not page.get("IsTruncated"):
                return sizes
            token = page.get("NextContinuationToken")

    def _get(self, key: str, byte_range: str | None = None) -> bytes:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if byte_range:
            kwargs["Range"] = byte_range
        response = self.client.get_object(**kwargs)
        body = response["Body"]
        try:
            data: bytes = body.read(MAX_JSON_BYTES + 1)
            return data
        finally:
            body.close()

    def _get_json(self, key: str) -> dict[str, Any] | None:
        try:
            raw = self._get(key)
        except Exception as exc:
            failure = classify(exc)
            if failure is not None and failure.kind == "not_found":
                return None
            raise
        if len(raw) > MAX_JSON_BYTES:
            raise ModelSourceError(f"s3://{self.bucket}/{key} is larger than expected")
        try:
            data = json.loads(raw)
        except ValueError:
            raise ModelSourceError(f"s3://{self.bucket}/{key} is not JSON") from None
        if not isinstance(data, dict):
            raise ModelSourceError(f"s3://{self.bucket}/{key} is not a JSON object")
        return data

    def _header(self, key: str) -> tuple[list[TensorInfo], int, int, int]:
        """(tensors, file size implied by the header, requests, bytes read) of one file."""
        head = self._get(key, f"bytes=0-{HEADER_PROBE_BYTES - 1}")
        requests, read = 1, len(head)
        length = header_length(head)
        if 8 + length > len(head) == HEADER_PROBE_BYTES:  # a short read: the file ended
            rest = self._get(key, f"bytes={len(head)}-{8 + length - 1}")
            requests, read = 2, read + len(rest)
            head += rest
        where = f"s3://{self.bucket}/{key}"
        if len(head) < 8 + length:
            raise ModelSourceError(f"{where}: file ends inside its header")
        tensors, data_end = parse_header(head[8 : 8 + length], where=where)
        return tensors, 8 + length + data_end, requests, read

    def read_s3(self, spec: ModelSpec) -> ModelMeta:
        """Metadata from S3; raises ``ModelSourceError`` when it cannot be read."""
        prefix = spec.s3_prefix
        where = self.location(spec)
        try:
            with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
                listing_f = pool.submit(self._list, prefix)
                config_f = pool.submit(self._get_json, prefix + CONFIG_NAME)
                index_f = pool.submit(self._get_json, prefix + INDEX_NAME)
                listing = listing_f.result()
                config_raw = config_f.result()
                index = index_f.result()
                requests = 3
                bytes_read = sum(
                    listing.get(prefix + n, 0)
                    for n in (CONFIG_NAME, INDEX_NAME)
                    if prefix + n in listing
                )
                files = weight_files(prefix, listing, index)
                if not files:
                    raise WeightsNotFound(f"no safetensors weights under {where}")
                headers = list(pool.map(self._header, files))
        except ModelSourceError:
            raise
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            raise ModelSourceError(f"{where}: {failure.text}") from None
        notes: list[str] = []
        config: ModelConfig | None = None
        if config_raw is None:
            notes.append(f"no {CONFIG_NAME} under {where}: KV cache size approximated")
        else:
            config = parse_config(config_raw, where=f"{where}{CONFIG_NAME}")
        tensors: list[TensorInfo] = []
        shard_sizes: list[int] = []
        for key, (found, implied, reqs, read) in zip(files, headers, strict=True):
            tensors += found
            shard_sizes.append(max(implied, listing.get(key, 0)))
            requests += reqs
            bytes_read += read
        stats = summarize_tensors(
            tensors,
            quant_bits=(config.quant_bits if config and config.quant_bits else 4),
            quant_method=config.quant_method if config else None,
        )
        total_size = (index or {}).get("metadata", {}).get("total_size")
        if isinstance(total_size, int) and total_size > 0 and total_size != stats.stored_bytes:
            notes.append(
                f"index total_size {total_size} differs from the headers' {stats.stored_bytes}"
            )
        weight_set = set(files)
        other_files = sum(
            size
            for key, size in listing.items()
            if key not in weight_set
            and "/" not in key[len(prefix) :]
            and not key.endswith(".safetensors")
        )
        return ModelMeta(
            name=spec.name,
            source="s3",
            location=where,
            exists=True,
            config=config,
            weights=stats,
            download_bytes=sum(shard_sizes) + other_files,
            largest_shard_bytes=max(shard_sizes),
            shard_count=len(files),
            notes=notes,
            requests=requests,
            bytes_read=bytes_read,
        )
