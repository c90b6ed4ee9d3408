"""Pull one model revision from S3 onto this host, resumably, and land it atomically.

Runs ON THE GPU HOST with the service venv's python (3.10 or newer), sent on stdin
(``python - ARGS``), so it is one self-contained file: the standard library plus
boto3/botocore, nothing else.

    python - --bucket B --prefix models/x/ --models-dir /opt/models --name x
             [--revision R] [--concurrency 16] [--part-size 64M] [--disk-margin-bytes 2G]
             [--max-rate BYTES_PER_S] [--endpoint-url URL] [--region R] [--retries 4]
             [--progress-interval 0.5] [--read-timeout 60] [--verify-only]

Credentials: boto3's standard chain (instance profile, environment, profile). The endpoint is
``--endpoint-url`` or whatever boto3 reads itself (``AWS_ENDPOINT_URL``, profile config).

Layout under ``--models-dir``::

    <name>/<revision>/             the verified model plus manifest.json; only ever created by
                                   one rename of a complete staging directory
    <name>/.staging-<revision>/    a pull in progress: preallocated files, written by ranged
                                   GETs, and .pull/<file>.json journals of the finished chunks
    <name>/.pull.lock              flock held while a pull of <name> runs

The revision is ``--revision`` (the catalog's) or a short hash of the sorted (relative key,
size, ETag) list. When ``<name>/<revision>/manifest.json`` exists and the sizes on disk match
it, the model is "already present" and nothing is fetched; with ``--revision`` given that check
needs no S3 access at all.

Every file is fetched as byte ranges of ``--part-size`` by a thread pool (ranges of one file
and of different files in parallel), each written with ``os.pwrite`` into its preallocated
file, flushed, then recorded in the file's journal; an interrupted pull resumes at chunk
granularity. A finished file is verified: its size, then S3's ChecksumSHA256 when the object
has one, else its ETag (MD5 for single-part uploads, ``md5(part md5s)-N`` for multipart ones,
the part size found with a HEAD of part 1 or tried from the common sizes). A file that cannot
be verified that way (SSE-KMS ETags, odd part layouts) keeps its sha256 in the manifest and is
reported in a warning. A file that fails verification is removed from staging.

Output: JSON lines on stdout, nothing else::

    {"event": "start", "name", "revision", "files", "total", "to_fetch", "resumed_bytes", ...}
    {"event": "progress", "bytes", "total", "fetched", "rate_bps", "eta_s", "files_done", "files"}
    {"event": "file", "path", "size", "verified_by"}
    {"event": "warning", "message"}
    {"event": "done", "status": "pulled"|"present"|"verified", "path", "revision", "total",
     "fetched_bytes", "resumed_bytes", "elapsed_s", "unverified": [...], "message"}
    {"event": "error", "code", "message", "staging"}

Exit status: 0 done, 1 internal error, 2 usage, 3 source (not found, access denied, endpoint
unreachable, object changed or vanished), 4 not enough disk, 5 corrupt data, 6 another pull
of the model is running, 130 interrupted. Staging is kept on every error for the next run.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

MANIFEST = "manifest.json"
JOURNAL_DIR = ".pull"
MANIFEST_FORMAT = 1
READ_SIZE = 1 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ETAG_RE = re.compile(r"^([0-9a-f]{32})(?:-(\d+))?$")
MIB = 1 << 20
# Part sizes uploaders commonly use (aws cli/boto3 8 MiB, s3cmd 15 MiB, rclone/hf 5 MiB, ...).
COMMON_PART_SIZES = tuple(
    sorted(
        {n * MIB for n in (5, 8, 10, 15, 16, 25, 32, 50, 64, 100, 128, 256, 512, 1024)}
        | {n * 1000 * 1000 for n in (5, 8, 10, 16, 50, 64, 100)}
    )
)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_SOURCE, EXIT_DISK, EXIT_CORRUPT, EXIT_BUSY = range(7)
EXIT_INTERRUPTED = 130
EXIT_FOR_CODE = {
    "usage": EXIT_USAGE,
    "not_found": EXIT_SOURCE,
    "access_denied": EXIT_SOURCE,
    "endpoint": EXIT_SOURCE,
    "changed": EXIT_SOURCE,
    "source": EXIT_SOURCE,
    "disk": EXIT_DISK,
    "io": EXIT_DISK,
    "corrupt": EXIT_CORRUPT,
    "busy": EXIT_BUSY,
    "interrupted": EXIT_INTERRUPTED,
    "internal": EXIT_INTERNAL,
}


class PullError(Exception):
    """A failure reported as one error event; ``code`` picks the exit status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------- output


class Emitter:
    """JSON lines on stdout, one writer at a time; a closed pipe stops the pull."""

    def __init__(self, stop: threading.Event, stream: Any = None) -> None:
        self._lock = threading.Lock()
        self._stop = stop
        self._stream = stream or sys.stdout
        self.broken = False

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n"
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                # The operator went away: stop cleanly, journals stay consistent.
                self.broken = True
                self._stop.set()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str) -> int:
    """``67108864``, ``64M``, ``64MiB``, ``2G``, ``512k`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 2G, 1048576)")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]


# ------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class RemoteObject:
    key: str
    rel: str  # path below the prefix, also the path below the model directory
    size: int
    etag: str  # without quotes


def safe_relpath(prefix: str, key: str) -> str | None:
    """The path of ``key`` below ``prefix``; None for folder markers; PullError if unsafe."""
    if not key.startswith(prefix):
        raise PullError("source", f"listed key {key!r} is outside the prefix {prefix!r}")
    rel = key[len(prefix) :]
    if rel == "" or rel.endswith("/"):
        return None
    parts = rel.split("/")
    bad = (
        any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 32 or c in "\\\x7f" for c in rel)
        or parts[0] in (JOURNAL_DIR, MANIFEST)
    )
    if bad:
        raise PullError(
            "source",
            f"refusing object key {key!r}: its path below the prefix is not a safe "
            f"relative file path (or uses the reserved names {JOURNAL_DIR!r}/{MANIFEST!r})",
        )
    return rel


def check_layout(objects: list[RemoteObject]) -> None:
    """No file may also be a directory of another (``a`` and ``a/b``)."""
    files = {o.rel for o in objects}
    for obj in objects:
        parts = obj.rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise PullError(
                    "source",
                    f"key {obj.key!r} needs {parent!r} as a directory, but it is also a file",
                )


def compute_revision(objects: list[RemoteObject]) -> str:
    """A short, stable hash of what the prefix holds: sorted (relative key, size, etag)."""
    rows = sorted((o.rel, o.size, o.etag) for o in objects)
    digest = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    return digest[:12]


# --------------------------------------------------------------------------------- S3 glue


def _boto() -> tuple[Any, Any, Any]:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError as exc:  # pragma: no cover - the venv always has boto3
        raise PullError("internal", f"boto3 is not installed for {sys.executable}: {exc}") from None
    return boto3, botocore.config, botocore.exceptions


def make_client(args: argparse.Namespace) -> Any:
    boto3, bconfig, _ = _boto()
    config = bconfig.Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=min(10.0, args.read_timeout),
        read_timeout=args.read_timeout,
        max_pool_connections=args.concurrency + 4,
    )
    kwargs: dict[str, Any] = {"config": config}
    if args.endpoint_url:
        kwargs["endpoint_url"] = args.endpoint_url
    if args.region:
        kwargs["region_name"] = args.region
    return boto3.session.Session().client("s3", **kwargs)


def classify(exc: BaseException, what: str) -> PullError:
    """Map a boto/network exception to an error code and a message naming ``what``."""
    _, _, bexc = _boto()
    if isinstance(exc, PullError):
        return exc
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return PullError(
            "access_denied",
            f"{what}: no AWS credentials on this host (instance profile, environment or ~/.aws)",
        )
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = err.get("Message") or code
        if code in ("NoSuchBucket",):
            return PullError("not_found", f"{what}: the bucket does not exist")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return PullError("changed", f"{what}: the object is gone (deleted during the pull?)")
        if (
            code
            in (
                "AccessDenied",
                "403",
                "Forbidden",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "ExpiredToken",
                "AllAccessDisabled",
            )
            or status == 403
        ):
            return PullError("access_denied", f"{what}: access denied ({detail})")
        if code in ("PreconditionFailed", "412") or status == 412:
            return PullError(
                "changed",
                f"{what}: the object changed during the pull "
                "(its ETag no longer matches); run again to fetch the new version",
            )
        return PullError("source", f"{what}: S3 error {code or status}: {detail}")
    if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectTimeoutError):
        return PullError("endpoint", f"{what}: cannot reach the S3 endpoint ({exc})")
    if isinstance(exc, bexc.BotoCoreError | ConnectionError | TimeoutError):
        return PullError("endpoint", f"{what}: transfer failed ({type(exc).__name__}: {exc})")
    return PullError("internal", f"{what}: {type(exc).__name__}: {exc}")


def is_transient(exc: BaseException) -> bool:
    _, _, bexc = _boto()
    if isinstance(exc, ShortRead | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, bexc.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError")
    # Connection resets, read timeouts, truncated streams (ResponseStreamingError) ...
    return isinstance(exc, bexc.BotoCoreError) and not isinstance(
        exc, bexc.NoCredentialsError | bexc.PartialCredentialsError
    )


def list_prefix(s3: Any, bucket: str, prefix: str) -> list[RemoteObject]:
    where = f"s3://{bucket}/{prefix}"
    objects: list[RemoteObject] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                rel = safe_relpath(prefix, item["Key"])
                if rel is None:
                    continue
                etag = str(item.get("ETag", "")).strip('"').lower()
                objects.append(RemoteObject(item["Key"], rel, int(item["Size"]), etag))
    except Exception as exc:
        raise classify(exc, f"listing {where}") from None
    if not objects:
        raise PullError("not_found", f"no objects under {where}")
    objects.sort(key=lambda o: o.rel)
    check_layout(objects)
    return objects


@dataclass
class ObjectMeta:
    """What HEAD says beyond the listing: checksums and the part size of multipart uploads."""

    checksum_sha256: str | None = None
    part_size: int | None = None
    parts: int | None = None
    etag_is_md5: bool = True


def head_meta(s3: Any, bucket: str, obj: RemoteObject) -> ObjectMeta:
    where = f"s3://{bucket}/{obj.key}"
    try:
        head = s3.head_object(Bucket=bucket, Key=obj.key, ChecksumMode="ENABLED")
    except Exception as exc:
        raise classify(exc, where) from None
    if str(head.get("ETag", "")).strip('"').lower() != obj.etag:
        raise PullError("changed", f"{where}: the object changed since it was listed")
    meta = ObjectMeta(checksum_sha256=head.get("ChecksumSHA256"))
    sse = head.get("ServerSideEncryption") or ""
    if sse.startswith("aws:kms") or head.get("SSECustomerAlgorithm"):
        meta.etag_is_md5 = False  # SSE-KMS / SSE-C ETags are not an MD5 of the data
    match = ETAG_RE.fullmatch(obj.etag)
    if match is None:
        meta.etag_is_md5 = False
    elif match.group(2) is not None:
        meta.parts = int(match.group(2))
        try:
            part1 = s3.head_object(Bucket=bucket, Key=obj.key, PartNumber=1)
            meta.part_size = int(part1["ContentLength"])
        except Exception as exc:
            if not is_transient(exc) and classify(exc, where).code == "changed":
                raise classify(exc, where) from None
            meta.part_size = None  # not allowed or not supported: guess from common sizes
    return meta


# ------------------------------------------------------------------------------- hashing


def multipart_etag(part_md5s: list[bytes]) -> str:
    return hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest() + (
        f"-{len(part_md5s)}"
    )


def candidate_part_sizes(size: int, parts: int, known: int | None = None) -> list[int]:
    """Part sizes that split ``size`` bytes into exactly ``parts`` parts, likeliest first."""

    def fits(p: int) -> bool:
        return p > 0 and -(-size // p) == parts

    if known is not None:
        return [known] if fits(known) else []
    out = [p for p in COMMON_PART_SIZES if fits(p)]
    if parts > 0:
        even = -(-size // parts)  # an uploader that divides the file evenly
        for p in (-(-even // MIB) * MIB, even):
            if fits(p) and p not in out:
                out.append(p)
    return out


@dataclass
class Digests:
    md5: str
    sha256: str
    part_md5: dict[int, list[bytes]] = field(default_factory=dict)
    part_sha256: dict[int, list[bytes]] = field(default_factory=dict)


def hash_file(
    path: str, part_sizes: list[int], sha_parts: bool, stop: threading.Event | None = None
) -> Digests:
    """One read of the file: whole md5/sha256 and per-part digests for each part size."""
    whole_md5 = hashlib.md5(usedforsecurity=False)
    whole_sha = hashlib.sha256()
    cur: dict[int, list[Any]] = {
        p: [hashlib.md5(usedforsecurity=False), hashlib.sha256() if sha_parts else None, 0]
        for p in part_sizes
    }
    out = Digests("", "", {p: [] for p in part_sizes}, {p: [] for p in part_sizes})
    with open(path, "rb", buffering=0) as fh:
        while True:
            if stop is not None and stop.is_set():
                raise PullError("interrupted", "interrupted")
            block = fh.read(8 * MIB)
            if not block:
                break
            whole_md5.update(block)
            whole_sha.update(block)
            for p, state in cur.items():
                view = memoryview(block)
                while view:
                    take = min(len(view), p - state[2])
                    state[0].update(view[:take])
                    if state[1] is not None:
                        state[1].update(view[:take])
                    state[2] += take
                    view = view[take:]
                    if state[2] == p:
                        out.part_md5[p].append(state[0].digest())
                        if state[1] is not None:
                            out.part_sha256[p].append(state[1].digest())
                        state[0] = hashlib.md5(usedforsecurity=False)
                        state[1] = hashlib.sha256() if sha_parts else None
                        state[2] = 0
    for p, state in cur.items():
        if state[2]:
            out.part_md5[p].append(state[0].digest())
            if state[1] is not None:
                out.part_sha256[p].append(state[1].digest())
    out.md5 = whole_md5.hexdigest()
    out.sha256 = whole_sha.hexdigest()
    return out


def verify_file(
    path: str, obj: RemoteObject, meta: ObjectMeta, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Check a finished file; a manifest record, or PullError("corrupt")."""
    where = obj.key
    actual = os.path.getsize(path)
    if actual != obj.size:
        raise PullError("corrupt", f"{obj.rel}: {actual} bytes on disk, S3 says {obj.size}")
    checksum = meta.checksum_sha256
    composite = None
    if checksum and "-" in checksum:
        checksum, _, count = checksum.partition("-")
        composite = int(count) if count.isdigit() else None
    part_sizes: list[int] = []
    if meta.parts is not None:
        part_sizes = candidate_part_sizes(obj.size, meta.parts, meta.part_size)
    if composite is not None and not part_sizes:
        part_sizes = candidate_part_sizes(obj.size, composite, meta.part_size)
    digests = hash_file(path, part_sizes, sha_parts=composite is not None, stop=stop)
    record: dict[str, Any] = {
        "path": obj.rel,
        "key": obj.key,
        "size": obj.size,
        "etag": obj.etag,
        "sha256": digests.sha256,
        "verified_by": "size-only",
    }
    if checksum and composite is None:
        if base64.b64encode(bytes.fromhex(digests.sha256)).decode() != checksum:
            raise PullError("corrupt", f"{where}: sha256 does not match S3's ChecksumSHA256")
        record["verified_by"] = "checksum-sha256"
        return record
    if checksum and composite is not None:
        for p in part_sizes:
            parts = digests.part_sha256.get(p, [])
            if len(parts) == composite:
                combined = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
                if combined == checksum:
                    record["verified_by"] = "checksum-sha256-composite"
                    return record
        if meta.part_size is not None and part_sizes:
            raise PullError("corrupt", f"{where}: composite sha256 does not match S3's checksum")
    if not meta.etag_is_md5:
        return record
    if meta.parts is None:
        if digests.md5 != obj.etag:
            raise PullError("corrupt", f"{where}: MD5 {digests.md5} does not match ETag {obj.etag}")
        record["verified_by"] = "etag-md5"
        return record
    for p in part_sizes:
        if multipart_etag(digests.part_md5[p]) == obj.etag:
            record["verified_by"] = "etag-multipart"
            record["part_size"] = p
            return record
    if meta.part_size is not None and part_sizes:
        # S3 told us the part size and the layout is uniform: a mismatch is bad data.
        raise PullError("corrupt", f"{where}: multipart ETag mismatch (part size {meta.part_size})")
    return record  # unknown part layout: sha256 recorded, reported as unverified


SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def check_safetensors(path: str, rel: str) -> None:
    """A safetensors file must be whole: its header parses and its tensors exactly fill the
    data that follows it (the format allows no holes). S3 may hold a truncated or damaged
    object with a matching ETag; this catches it before the model lands, not at load."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise PullError("corrupt", f"{rel}: {size} bytes, too short for a safetensors file")
        header_len = int.from_bytes(raw_len, "little")
        if header_len > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise PullError("corrupt", f"{rel}: safetensors header length {header_len} is bogus")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise PullError("corrupt", f"{rel}: safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise PullError("corrupt", f"{rel}: safetensors header is not a JSON object")
    data_len = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise PullError(
                "corrupt", f"{rel}: tensor {name!r} lies outside the file ({data_len} data bytes)"
            )
        end = max(end, offsets[1])
    if end != data_len:
        raise PullError(
            "corrupt", f"{rel}: tensors cover {end} of {data_len} data bytes (truncated or padded)"
        )


# ------------------------------------------------------------------------------- journals


class Journal:
    """The finished chunks of one staged file, rewritten atomically after each chunk."""

    def __init__(self, path: str, obj: RemoteObject, chunk_size: int) -> None:
        self.path = path
        self.obj = obj
        self.chunk_size = chunk_size
        self.done: set[int] = set()
        self.verified: dict[str, Any] | None = None
        # (inode, size, mtime_ns) of the staged file when it was verified: a file that no
        # longer matches is not trusted, here or at landing.
        self.verified_stat: list[int] | None = None

    @property
    def chunks(self) -> int:
        return max(1, -(-self.obj.size // self.chunk_size)) if self.obj.size else 0

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(self.obj.size, start + self.chunk_size)

    def done_bytes(self) -> int:
        return sum(e - s for s, e in map(self.chunk_range, self.done))

    @classmethod
    def load(cls, path: str, obj: RemoteObject, chunk_size: int) -> tuple[Journal, bool]:
        """(journal, reusable): a journal for a different object version starts empty."""
        fresh = cls(path, obj, chunk_size)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            same = (
                data.get("key") == obj.key
                and data.get("size") == obj.size
                and data.get("etag") == obj.etag
                and int(data.get("chunk_size") or 0) > 0
            )
            if not same:
                return fresh, False
            journal = cls(path, obj, int(data["chunk_size"]))
            journal.done = {int(i) for i in data.get("done", []) if 0 <= int(i) < journal.chunks}
            verified = data.get("verified")
            journal.verified = verified if isinstance(verified, dict) else None
            stat = data.get("verified_stat")
            journal.verified_stat = [int(v) for v in stat] if isinstance(stat, list) else None
        except (OSError, ValueError, TypeError, AttributeError):
            return fresh, False
        return journal, True

    def save(self) -> None:
        data = {
            "key": self.obj.key,
            "size": self.obj.size,
            "etag": self.obj.etag,
            "chunk_size": self.chunk_size,
            "done": sorted(self.done),
            "verified": self.verified,
            "verified_stat": self.verified_stat,
        }
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------ progress


class Progress:
    """Counters shared by the workers; a reporter thread turns them into events."""

    def __init__(self, total: int, resumed: int, files: int, files_done: int) -> None:
        self.lock = threading.Lock()
        self.total = total
        self.present = resumed  # bytes in staging: journaled chunks plus chunks in flight
        self.fetched = 0  # bytes received from S3 in this run (retries included)
        self.files = files
        self.files_done = files_done
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        with self.lock:
            self.present += n
            self.fetched += n

    def rollback(self, n: int) -> None:
        with self.lock:
            self.present -= n

    def snapshot(self, window_s: float = 5.0) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            present, fetched, files_done = self.present, self.fetched, self.files_done
            self.samples.append((now, fetched))
            while len(self.samples) > 2 and now - self.samples[0][0] > window_s:
                self.samples.popleft()
            t0, f0 = self.samples[0]
        rate = (fetched - f0) / (now - t0) if now - t0 > 0.05 else 0.0
        remaining = max(0, self.total - present)
        eta = round(remaining / rate, 1) if rate > 0 else None
        return {
            "bytes": present,
            "total": self.total,
            "fetched": fetched,
            "rate_bps": int(rate),
            "eta_s": eta,
            "files_done": files_done,
            "files": self.files,
        }


class RateLimiter:
    """A shared bytes-per-second cap (``--max-rate``): keeps room for the resident service."""

    def __init__(self, rate: int | None, stop: threading.Event) -> None:
        self.rate = rate
        self.stop = stop
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
        if start > now:
            self.stop.wait(start - now)


# --------------------------------------------------------------------------------- paths


def file_identity(path: str) -> list[int] | None:
    """(inode, size, mtime_ns): what changes when anything writes or replaces the file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str) -> tuple[int, str]:
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize, probe


def allocated_bytes(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def read_manifest(model_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(model_dir, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def manifest_sizes_ok(model_dir: str, manifest: dict[str, Any]) -> bool:
    """The cheap check: every file the manifest names is on disk with its size."""
    try:
        for entry in manifest["files"]:
            rel = entry["path"]
            if ".." in rel.split("/") or rel.startswith("/"):
                return False
            if os.path.getsize(os.path.join(model_dir, rel)) != int(entry["size"]):
                return False
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return True


def manifest_matches(manifest: dict[str, Any], objects: list[RemoteObject]) -> bool:
    have = {(f.get("path"), f.get("size"), f.get("etag")) for f in manifest["files"]}
    return have == {(o.rel, o.size, o.etag) for o in objects}


def deep_verify(model_dir: str, manifest: dict[str, Any], stop: threading.Event) -> list[str]:
    """Recompute every file's sha256 against the manifest; the list of bad files."""
    bad = []
    for entry in manifest["files"]:
        path = os.path.join(model_dir, entry["path"])
        try:
            if os.path.getsize(path) != int(entry["size"]):
                bad.append(f"{entry['path']} (size)")
                continue
            sha = hash_file(path, [], sha_parts=False, stop=stop).sha256
        except OSError as exc:
            bad.append(f"{entry['path']} ({exc.strerror})")
            continue
        if sha != entry.get("sha256"):
            bad.append(f"{entry['path']} (sha256)")
    return bad


# ---------------------------------------------------------------------------------- pull


@dataclass
class FileState:
    obj: RemoteObject
    dest: str
    journal: Journal
    meta: ObjectMeta | None = None
    fd: int = -1
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: set[int] = field(default_factory=set)


class ShortRead(Exception):
    pass


class Puller:
    def __init__(self, args: argparse.Namespace, emit: Emitter, stop: threading.Event) -> None:
        self.args = args
        self.emit = emit
        self.stop = stop
        self.s3: Any = None
        self.limiter = RateLimiter(args.max_rate, stop)
        self.name_dir = os.path.join(args.models_dir, args.name)
        self.staging: str | None = None
        self.started = time.monotonic()
        self.reporting_done = False

    def where(self, obj: RemoteObject | None = None) -> str:
        key = obj.key if obj else self.args.prefix
        return f"s3://{self.args.bucket}/{key}"

    # -- the steps -------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        if args.revision:
            final = os.path.join(self.name_dir, args.revision)
            done = self.try_present(final, args.revision, None)
            if done is not None:
                return done
        self.s3 = make_client(args)
        objects = list_prefix(self.s3, args.bucket, args.prefix)
        revision = args.revision or compute_revision(objects)
        final = os.path.join(self.name_dir, revision)
        done = self.try_present(final, revision, objects)
        if done is not None:
            return done
        if args.verify_only:
            raise PullError("not_found", f"{final} is not present (nothing to verify)")
        try:
            os.makedirs(self.name_dir, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise PullError("io", f"cannot create {self.name_dir}: {exc.strerror}") from None
        with self.flock():
            # Re-check under the lock: a pull that just finished may have landed it.
            done = self.try_present(final, revision, objects)
            if done is not None:
                return done
            return self.pull(objects, revision, final)

    def try_present(
        self, final: str, revision: str, objects: list[RemoteObject] | None
    ) -> int | None:
        manifest = read_manifest(final)
        if manifest is None:
            return None
        if self.args.verify_only:
            bad = deep_verify(final, manifest, self.stop)
            if bad:
                raise PullError(
                    "corrupt",
                    f"{final}: {len(bad)} file(s) do not match the manifest: {', '.join(bad[:5])}",
                )
            self.finish(
                "verified",
                final,
                revision,
                manifest,
                0,
                0,
                f"{final} verified against its manifest",
            )
            return EXIT_OK
        if not manifest_sizes_ok(final, manifest):
            self.emit(
                "warning",
                message=f"{final} exists but does not match its manifest; pulling it again",
            )
            return None
        if objects is not None and not manifest_matches(manifest, objects):
            self.emit(
                "warning",
                message=f"{final} was pulled from different objects than "
                f"{self.where()} now holds (revision {revision!r} reused?)",
            )
        self.finish(
            "present",
            final,
            revision,
            manifest,
            0,
            0,
            f"{self.args.name} revision {revision} already present at {final}",
        )
        return EXIT_OK

    def finish(
        self,
        status: str,
        final: str,
        revision: str,
        manifest: dict[str, Any],
        fetched: int,
        resumed: int,
        message: str,
    ) -> None:
        elapsed = time.monotonic() - self.started
        unverified = [f["path"] for f in manifest["files"] if f.get("verified_by") == "size-only"]
        self.emit(
            "done",
            status=status,
            name=self.args.name,
            revision=revision,
            path=final,
            total=sum(int(f["size"]) for f in manifest["files"]),
            files=len(manifest["files"]),
            fetched_bytes=fetched,
            resumed_bytes=resumed,
            elapsed_s=round(elapsed, 2),
            rate_bps=int(fetched / elapsed) if elapsed > 0 else 0,
            unverified=unverified,
            message=message,
        )

    @contextlib.contextmanager
    def flock(self) -> Any:
        path = os.path.join(self.name_dir, ".pull.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PullError(
                    "busy", f"another pull of {self.args.name} is running on this host"
                ) from None
            yield
        finally:
            os.close(fd)

    def pull(self, objects: list[RemoteObject], revision: str, final: str) -> int:
        args = self.args
        staging = os.path.join(self.name_dir, f".staging-{revision}")
        self.staging = staging
        jdir = os.path.join(staging, JOURNAL_DIR)
        states = [self.load_state(obj, staging, jdir) for obj in objects]
        total = sum(o.size for o in objects)
        need = sum(
            max(0, st.obj.size - allocated_bytes(st.dest))
            for st in states
            if st.journal.verified is None
        )
        free, mount = free_bytes(self.name_dir)
        if free < need + args.disk_margin_bytes:
            raise PullError(
                "disk",
                f"not enough free disk for {args.name} under {mount}: need "
                f"{human_bytes(need)} + {human_bytes(args.disk_margin_bytes)} margin,"
                f" {human_bytes(free)} free",
            )
        try:
            os.makedirs(jdir, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise PullError("io", f"cannot create {jdir}: {exc.strerror}") from None
        resumed = sum(st.journal.done_bytes() for st in states)
        todo = [st for st in states if st.journal.verified is None]
        progress = Progress(total, resumed, len(states), len(states) - len(todo))
        self.emit(
            "start",
            name=args.name,
            revision=revision,
            files=len(states),
            total=total,
            to_fetch=total - resumed,
            resumed_bytes=resumed,
            staging=staging,
            source=self.where(),
        )
        reporter = threading.Thread(target=self.report, args=(progress,), daemon=True)
        reporter.start()
        try:
            self.transfer(todo, progress)
        finally:
            self.reporting_done = True
            reporter.join()
        self.emit("progress", **progress.snapshot())
        return self.land(states, revision, final, staging, progress.fetched, resumed)

    def report(self, progress: Progress) -> None:
        while not self.reporting_done and not self.stop.is_set():
            self.emit("progress", **progress.snapshot())
            deadline = time.monotonic() + self.args.progress_interval
            while time.monotonic() < deadline and not self.reporting_done:
                self.stop.wait(min(0.05, self.args.progress_interval))

    def load_state(self, obj: RemoteObject, staging: str, jdir: str) -> FileState:
        dest = os.path.join(staging, obj.rel)
        jpath = os.path.join(jdir, obj.rel + ".json")
        journal, reusable = Journal.load(jpath, obj, self.args.part_size)
        if not reusable and os.path.exists(dest):
            self.emit(
                "warning",
                message=f"{obj.rel}: staged data is for another version of "
                "the object; fetching it anew",
            )
            os.unlink(dest)
        if (journal.done or journal.verified) and (
            not os.path.isfile(dest) or os.path.getsize(dest) != obj.size
        ):
            journal.verified = None  # the staged file vanished or was cut: start it over
            journal.done.clear()
        elif journal.verified is not None and journal.verified_stat != file_identity(dest):
            self.emit(
                "warning",
                message=f"{obj.rel}: the staged file changed after it was verified; "
                "fetching it anew",
            )
            journal.verified = journal.verified_stat = None
            journal.done.clear()
        state = FileState(obj, dest, journal)
        state.pending = set(range(journal.chunks)) - journal.done
        return state

    def open_dest(self, st: FileState) -> None:
        os.makedirs(os.path.dirname(st.dest), mode=0o755, exist_ok=True)
        os.makedirs(os.path.dirname(st.journal.path), mode=0o755, exist_ok=True)
        fd = os.open(st.dest, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != st.obj.size:
                os.ftruncate(fd, min(os.fstat(fd).st_size, st.obj.size))
                if st.obj.size:
                    try:
                        os.posix_fallocate(fd, 0, st.obj.size)  # fail now, not at 90 %
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            raise
                        os.ftruncate(fd, st.obj.size)  # fallocate unsupported here
        except OSError as exc:
            os.close(fd)
            code = "disk" if exc.errno == errno.ENOSPC else "io"
            raise PullError(code, f"cannot allocate {st.dest}: {exc.strerror}") from None
        st.fd = fd

    def transfer(self, todo: list[FileState], progress: Progress) -> None:
        pool = cf.ThreadPoolExecutor(max_workers=self.args.concurrency, thread_name_prefix="pull")
        futures: dict[cf.Future[Any], tuple[str, FileState]] = {}
        failure: PullError | None = None
        try:
            for st in todo:  # HEADs first: permissions and checksums before any GET
                futures[pool.submit(head_meta, self.s3, self.args.bucket, st.obj)] = ("head", st)
            while futures:
                done, _ = cf.wait(futures, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                if self.stop.is_set() and failure is None:
                    failure = PullError("interrupted", "interrupted; staging kept for resume")
                for fut in done:
                    kind, st = futures.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as exc:
                        if failure is None:
                            failure = classify(exc, self.where(st.obj))
                            if failure.code == "corrupt":
                                self.discard(st)
                        self.stop.set()
                        continue
                    if failure is not None:
                        continue
                    if kind == "head":
                        st.meta = result
                        if st.pending or not os.path.exists(st.dest):
                            self.open_dest(st)
                        if st.pending:
                            for index in sorted(st.pending):
                                fut2 = pool.submit(self.fetch_chunk, st, index, progress)
                                futures[fut2] = ("chunk", st)
                        else:
                            futures[pool.submit(self.verify, st)] = ("verify", st)
                    elif kind == "chunk" and result:
                        futures[pool.submit(self.verify, st)] = ("verify", st)
                    elif kind == "verify":
                        with progress.lock:
                            progress.files_done += 1
                        self.emit(
                            "file",
                            path=st.obj.rel,
                            size=st.obj.size,
                            verified_by=result["verified_by"],
                        )
                if failure is not None:
                    self.stop.set()
                    for fut in list(futures):
                        if fut.cancel():
                            futures.pop(fut)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for st in todo:
                if st.fd >= 0:
                    os.close(st.fd)
                    st.fd = -1
        if failure is not None:
            raise failure

    def fetch_chunk(self, st: FileState, index: int, progress: Progress) -> bool:
        """Fetch one byte range; True when it was the file's last missing chunk."""
        start, end = st.journal.chunk_range(index)
        attempts = max(1, self.args.retries)
        for attempt in range(attempts):
            counter = [0]
            try:
                self.fetch_range(st, start, end, progress, counter)
                break
            except Exception as exc:
                progress.rollback(counter[0])  # a retried range is counted once
                if self.stop.is_set():
                    raise PullError("interrupted", "interrupted") from None
                if attempt + 1 >= attempts or not is_transient(exc):
                    if isinstance(exc, ShortRead):
                        raise PullError(
                            "source",
                            f"{self.where(st.obj)}: the object ended "
                            f"early ({exc}); staging kept for resume",
                        ) from None
                    raise
                self.stop.wait(min(8.0, 0.5 * 2**attempt))
        os.fdatasync(st.fd)  # data on disk before the journal says so
        with st.lock:
            st.journal.done.add(index)
            st.pending.discard(index)
            st.journal.save()
            return not st.pending

    def fetch_range(
        self, st: FileState, start: int, end: int, progress: Progress, counter: list[int]
    ) -> None:
        if self.stop.is_set():
            raise PullError("interrupted", "interrupted")
        resp = self.s3.get_object(
            Bucket=self.args.bucket,
            Key=st.obj.key,
            Range=f"bytes={start}-{end - 1}",
            IfMatch=f'"{st.obj.etag}"',
        )
        body = resp["Body"]
        offset = start
        try:
            while offset < end:
                if self.stop.is_set():
                    raise PullError("interrupted", "interrupted")
                data = body.read(min(READ_SIZE, end - offset))
                if not data:
                    raise ShortRead(f"got {offset - start} of {end - start} bytes at {start}")
                self.limiter.take(len(data))
                view = memoryview(data)
                while view:
                    written = os.pwrite(st.fd, view, offset)
                    view = view[written:]
                    offset += written
                counter[0] += len(data)
                progress.add(len(data))
        finally:
            body.close()

    def verify(self, st: FileState) -> dict[str, Any]:
        if st.journal.verified is not None:
            return st.journal.verified
        if st.meta is None:  # pragma: no cover - HEAD always precedes
            raise PullError("internal", "verify before head")
        record = verify_file(st.dest, st.obj, st.meta, self.stop)
        if st.obj.rel.endswith(".safetensors"):
            check_safetensors(st.dest, st.obj.rel)
        with st.lock:
            st.journal.verified = record
            st.journal.verified_stat = file_identity(st.dest)
            st.journal.save()
        return record

    def discard(self, st: FileState) -> None:
        """Corrupt data is removed from staging so the next run fetches it anew."""
        for path in (st.dest, st.journal.path):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def land(
        self,
        states: list[FileState],
        revision: str,
        final: str,
        staging: str,
        fetched: int,
        resumed: int,
    ) -> int:
        args = self.args
        records = [st.journal.verified for st in states]
        if any(r is None for r in records):  # pragma: no cover - transfer verifies them all
            raise PullError("internal", "a file was not verified")
        for rec in records:
            if rec and rec["verified_by"] == "size-only":
                self.emit(
                    "warning",
                    message=f"{rec['path']}: could not be verified against S3 "
                    "(no MD5 ETag or checksum usable); its sha256 is in the manifest",
                )
        keep = {st.obj.rel for st in states}
        for root, dirs, files in os.walk(staging, topdown=True):
            rel_root = os.path.relpath(root, staging)
            if rel_root == ".":
                dirs[:] = [d for d in dirs if d != JOURNAL_DIR]
            for fname in files:
                rel = fname if rel_root == "." else f"{rel_root}/{fname}"
                if rel not in keep:
                    os.unlink(os.path.join(root, fname))  # no longer in S3: not part of it
        for st in states:
            if st.journal.verified_stat != file_identity(st.dest):
                self.discard(st)
                raise PullError(
                    "corrupt",
                    f"{st.obj.rel} changed in staging after it was verified; "
                    "run the pull again to fetch it anew",
                )
            fd = os.open(st.dest, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        shutil.rmtree(os.path.join(staging, JOURNAL_DIR), ignore_errors=True)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": args.name,
            "revision": revision,
            "source": {
                "bucket": args.bucket,
                "prefix": args.prefix,
                "endpoint": args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
            },
            # timezone.utc, not datetime.UTC: the host's python may be older than 3.11.
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
            "total_bytes": sum(st.obj.size for st in states),
            "files": records,
        }
        mpath = os.path.join(staging, MANIFEST)
        with open(mpath, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(mpath, 0o644)
        fsync_dir(staging)
        trash = None
        if os.path.lexists(final):  # a broken copy under the final name: replace it
            trash = os.path.join(self.name_dir, f".trash-{revision}-{os.getpid()}")
            os.rename(final, trash)
        os.rename(staging, final)
        fsync_dir(self.name_dir)
        self.staging = None
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
        self.finish(
            "pulled",
            final,
            revision,
            manifest,
            fetched,
            resumed,
            f"{args.name} revision {revision} pulled to {final}",
        )
        return EXIT_OK


# ----------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pull_model", description=__doc__.split("\n")[0])
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", required=True, help="key prefix, ending in '/'")
    p.add_argument("--models-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--revision")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--part-size", type=parse_size, default=64 * MIB)
    p.add_argument("--disk-margin-bytes", type=parse_size, default=1 << 30)
    p.add_argument("--max-rate", type=parse_size, default=None, help="bytes per second")
    p.add_argument("--retries", type=int, default=4, help="attempts per chunk")
    p.add_argument("--progress-interval", type=float, default=0.5)
    p.add_argument(
        "--read-timeout", type=float, default=60.0, help="seconds a stalled S3 read may wait"
    )
    p.add_argument("--endpoint-url")
    p.add_argument("--region")
    p.add_argument("--verify-only", action="store_true")
    return p


def check_args(args: argparse.Namespace) -> None:
    if not NAME_RE.fullmatch(args.name) or ".." in args.name:
        raise PullError("usage", f"invalid model name {args.name!r}")
    if args.revision is not None and (
        not NAME_RE.fullmatch(args.revision) or ".." in args.revision
    ):
        raise PullError("usage", f"invalid revision {args.revision!r}")
    if not args.prefix.endswith("/") or args.prefix.startswith("/"):
        raise PullError("usage", f"prefix {args.prefix!r} must end with '/' and not start with it")
    if not os.path.isabs(args.models_dir):
        raise PullError("usage", f"--models-dir must be absolute: {args.models_dir!r}")
    if not 1 <= args.concurrency <= 128:
        raise PullError("usage", "--concurrency must be 1..128")
    if not 64 * 1024 <= args.part_size <= 4 << 30:
        raise PullError("usage", "--part-size must be between 64K and 4G")
    if args.progress_interval < 0.1:
        raise PullError("usage", "--progress-interval must be at least 0.1 s")


def main(
    argv: list[str] | None = None,
    *,
    stop: threading.Event | None = None,
    signals: list[int] | None = None,
) -> int:
    """Run one pull; ``stop`` ends it early, ``signals`` lists the signals that set it."""
    stop = stop or threading.Event()
    received = signals if signals is not None else []
    emit = Emitter(stop)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if not exc.code:
            return EXIT_OK
        emit("error", code="usage", message="bad arguments (see stderr)", staging=None)
        return EXIT_USAGE
    puller: Puller | None = None
    try:
        check_args(args)
        puller = Puller(args, emit, stop)
        return puller.run()
    except PullError as exc:
        err = exc
    except Exception as exc:  # a bug, or an exception boto3 raised outside our mapping
        err = classify(exc, "pull")
    if received and err.code not in ("corrupt",):
        err = PullError(
            "interrupted", f"interrupted by signal {received[0]}; staging kept for resume"
        )
    staging = puller.staging if puller is not None else None
    if staging is not None and not os.path.isdir(staging):
        staging = None
    emit("error", code=err.code, message=err.message, staging=staging)
    return EXIT_FOR_CODE.get(err.code, EXIT_INTERNAL)


def entry() -> int:
    """The process entry: signals end the pull cleanly (journals stay consistent)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    os.umask(0o022)  # weights are not secret; the service user must read them
    return main(stop=stop, signals=received)


if __name__ == "__main__":
    sys.exit(entry())
