"""The pull script's pure parts (hashing, ETags, paths, journals, progress) and the operator
side of the pull (argv, event parsing, error mapping, the S3 preflight)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from deployer import pull, s3
from deployer.catalog import parse_catalog
from deployer.config import Settings
from deployer.errors import CommandResult, ModelSourceError, RemoteCommandFailed

SCRIPT = Path(pull.__file__).resolve().parent / "remote" / "pull_model.py"
MIB = 1 << 20


@pytest.fixture(scope="module")
def pm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pull_model_under_test", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def s3_multipart_etag(data: bytes, part: int) -> str:
    parts = [md5(data[i : i + part]) for i in range(0, len(data), part)]
    return hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest() + f"-{len(parts)}"


# --------------------------------------------------------------------------- the script


def test_script_imports_only_stdlib_and_boto(pm: ModuleType) -> None:
    import ast

    tree = ast.parse(SCRIPT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"boto3", "botocore"}


def test_multipart_etag_and_part_size_inference(pm: ModuleType, tmp_path: Path) -> None:
    data = bytes(range(256)) * (41_000)  # 10.5 MB
    path = tmp_path / "f"
    path.write_bytes(data)
    etag = s3_multipart_etag(data, 5 * MIB)
    count = int(etag.split("-")[1])
    candidates = pm.candidate_part_sizes(len(data), count)
    assert 5 * MIB in candidates
    assert pm.candidate_part_sizes(len(data), count, known=5 * MIB) == [5 * MIB]
    assert pm.candidate_part_sizes(len(data), count, known=1 * MIB) == []
    digests = pm.hash_file(str(path), candidates, sha_parts=False)
    assert pm.multipart_etag(digests.part_md5[5 * MIB]) == etag
    assert digests.md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert digests.sha256 == hashlib.sha256(data).hexdigest()
    # An uploader that splits evenly is found too.
    even = -(-len(data) // 3)
    assert pm.multipart_etag(
        pm.hash_file(str(path), [even], sha_parts=False).part_md5[even]
    ) == s3_multipart_etag(data, even)
    assert even in pm.candidate_part_sizes(len(data), 3)


def obj(pm: ModuleType, data: bytes, etag: str, rel: str = "w.bin") -> Any:
    return pm.RemoteObject(key=f"p/{rel}", rel=rel, size=len(data), etag=etag)


def test_verify_file_methods(pm: ModuleType, tmp_path: Path) -> None:
    data = b"weights" * 300_000  # 2.1 MB
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    single = hashlib.md5(data, usedforsecurity=False).hexdigest()
    rec = pm.verify_file(str(path), obj(pm, data, single), pm.ObjectMeta())
    assert rec["verified_by"] == "etag-md5"
    assert rec["sha256"] == hashlib.sha256(data).hexdigest()

    multi = s3_multipart_etag(data, MIB)
    meta = pm.ObjectMeta(parts=3, part_size=MIB)
    assert pm.verify_file(str(path), obj(pm, data, multi), meta)["verified_by"] == "etag-multipart"

    checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
    meta = pm.ObjectMeta(checksum_sha256=checksum)
    assert pm.verify_file(str(path), obj(pm, data, single), meta)["verified_by"] == (
        "checksum-sha256"
    )
    part_shas = [hashlib.sha256(data[i : i + MIB]).digest() for i in range(0, len(data), MIB)]
    composite = base64.b64encode(hashlib.sha256(b"".join(part_shas)).digest()).decode() + "-3"
    meta = pm.ObjectMeta(checksum_sha256=composite, parts=3, part_size=MIB)
    assert pm.verify_file(str(path), obj(pm, data, multi), meta)["verified_by"] == (
        "checksum-sha256-composite"
    )

    # Unknown part layout, or an SSE-KMS ETag: not verifiable, sha256 recorded.
    odd = "0" * 32 + "-3"
    rec = pm.verify_file(str(path), obj(pm, data, odd), pm.ObjectMeta(parts=3))
    assert rec["verified_by"] == "size-only" and rec["sha256"]
    kms = pm.ObjectMeta(etag_is_md5=False)
    assert pm.verify_file(str(path), obj(pm, data, "abc"), kms)["verified_by"] == "size-only"


@pytest.mark.parametrize(
    ("etag", "meta", "size_delta"),
    [
        ("single-bad", {}, 0),
        ("multi-bad", {"parts": 3, "part_size": MIB}, 0),
        ("sha-bad", {"checksum_sha256": base64.b64encode(b"x" * 32).decode()}, 0),
        ("size", {}, 1),
    ],
)
def test_verify_file_detects_corruption(
    pm: ModuleType, tmp_path: Path, etag: str, meta: Mapping[str, Any], size_delta: int
) -> None:
    data = b"weights" * 300_000
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    good = (
        s3_multipart_etag(data, MIB)
        if "parts" in meta
        else hashlib.md5(data, usedforsecurity=False).hexdigest()
    )
    path.write_bytes(b"X" + data[1:] + b"\0" * size_delta)  # one byte flipped (or one extra)
    with pytest.raises(pm.PullError) as info:
        pm.verify_file(str(path), obj(pm, data, good), pm.ObjectMeta(**meta))
    assert info.value.code == "corrupt"


def _safetensors(tensors: dict[str, int], *, pad: bytes = b" ") -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, nbytes in tensors.items():
        header[name] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode() + pad
    return len(raw).to_bytes(8, "little") + raw + b"\x01" * offset


def test_whole_safetensors_pass(pm: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(_safetensors({"w": 64, "b": 8}))
    pm.check_safetensors(str(path), "a.safetensors")
    safetensors = pytest.importorskip("safetensors.numpy")
    numpy = pytest.importorskip("numpy")
    safetensors.save_file({"x": numpy.arange(12, dtype="float32")}, str(path))
    pm.check_safetensors(str(path), "a.safetensors")


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda b: b[:-1], "tensor 'b' lies outside"),  # truncated by one byte
        (lambda b: b + b"\0", "cover 72 of 73"),  # trailing bytes
        (lambda b: b[:5], "too short"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header length"),
        (lambda b: b[:8] + b"x" + b[9:], "not JSON"),
        (lambda b: b[:20] + b"\x00" * 40 + b[60:], "not JSON"),
    ],
)
def test_damaged_safetensors_are_corrupt(
    pm: ModuleType, tmp_path: Path, damage: Any, says: str
) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(damage(_safetensors({"w": 64, "b": 8})))
    with pytest.raises(pm.PullError) as info:
        pm.check_safetensors(str(path), "a.safetensors")
    assert info.value.code == "corrupt"
    assert says in str(info.value)


def test_safe_relpath(pm: ModuleType) -> None:
    assert pm.safe_relpath("m/x/", "m/x/a/b.json") == "a/b.json"
    assert pm.safe_relpath("m/x/", "m/x/") is None  # folder markers
    assert pm.safe_relpath("m/x/", "m/x/sub/") is None
    for bad in ("m/x/../etc/passwd", "m/x//abs", "m/x/a/./b", "m/x/.pull/j", "m/x/manifest.json",
                "m/x/new\nline", "m/y/outside"):  # fmt: skip
        with pytest.raises(pm.PullError):
            pm.safe_relpath("m/x/", bad)


def test_layout_conflict_and_revision(pm: ModuleType) -> None:
    a = pm.RemoteObject("p/a", "a", 1, "e1")
    b = pm.RemoteObject("p/a/b", "a/b", 1, "e2")
    with pytest.raises(pm.PullError):
        pm.check_layout([a, b])
    c = pm.RemoteObject("p/c", "c", 2, "e3")
    rev = pm.compute_revision([a, c])
    assert rev == pm.compute_revision([c, a]) and len(rev) == 12
    assert rev != pm.compute_revision([a, pm.RemoteObject("p/c", "c", 2, "e4")])
    # The prefix is not part of the revision: the same files elsewhere are the same revision.
    assert rev == pm.compute_revision([pm.RemoteObject("q/a", "a", 1, "e1"),
                                       pm.RemoteObject("q/c", "c", 2, "e3")])  # fmt: skip


def test_journal_round_trip_and_reset(pm: ModuleType, tmp_path: Path) -> None:
    o = pm.RemoteObject("p/w", "w", 10 * MIB + 5, "e" * 32)
    journal = pm.Journal(str(tmp_path / "w.json"), o, 4 * MIB)
    assert journal.chunks == 3
    assert journal.chunk_range(2) == (8 * MIB, 10 * MIB + 5)
    journal.done = {0, 2}
    journal.save()
    loaded, reusable = pm.Journal.load(str(tmp_path / "w.json"), o, 1 * MIB)
    assert reusable and loaded.done == {0, 2} and loaded.chunk_size == 4 * MIB
    assert loaded.done_bytes() == 4 * MIB + 2 * MIB + 5
    changed = pm.RemoteObject("p/w", "w", 10 * MIB + 5, "f" * 32)
    fresh, reusable = pm.Journal.load(str(tmp_path / "w.json"), changed, 1 * MIB)
    assert not reusable and fresh.done == set()
    (tmp_path / "w.json").write_text("{not json")
    assert pm.Journal.load(str(tmp_path / "w.json"), o, MIB)[1] is False


def test_parse_size(pm: ModuleType) -> None:
    assert pm.parse_size("64M") == 64 * MIB == pm.parse_size("64MiB")
    assert pm.parse_size("1048576") == MIB
    assert pm.parse_size("2G") == 2 << 30
    with pytest.raises(Exception, match="not a size"):
        pm.parse_size("lots")


def test_progress_rate_and_eta(pm: ModuleType) -> None:
    progress = pm.Progress(total=100 * MIB, resumed=10 * MIB, files=3, files_done=1)
    first = progress.snapshot()
    assert first["bytes"] == 10 * MIB and first["eta_s"] is None
    time.sleep(0.1)
    progress.add(10 * MIB)
    snap = progress.snapshot()
    assert snap["bytes"] == 20 * MIB and snap["fetched"] == 10 * MIB
    assert snap["rate_bps"] > 0 and snap["eta_s"] > 0
    progress.rollback(MIB)  # a retried range is not counted twice
    assert progress.snapshot()["bytes"] == 19 * MIB


def test_rate_limiter_caps_throughput(pm: ModuleType) -> None:
    limiter = pm.RateLimiter(1 * MIB, threading.Event())
    started = time.monotonic()
    for _ in range(4):
        limiter.take(64 * 1024)  # 256 KiB at 1 MiB/s: the last block waits ~0.19 s
    assert time.monotonic() - started >= 0.15


def test_emitter_stops_the_pull_when_the_reader_is_gone(pm: ModuleType) -> None:
    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    stop = threading.Event()
    emit = pm.Emitter(stop, Closed())
    emit("progress", bytes=1)
    assert stop.is_set() and emit.broken


def test_usage_errors_are_events(
    pm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = pm.main(["--bucket", "b", "--prefix", "noslash", "--models-dir", str(tmp_path),
                    "--name", "demo"])  # fmt: skip
    event = json.loads(capsys.readouterr().out)
    assert code == 2 and event["event"] == "error" and event["code"] == "usage"
    code = pm.main(["--bucket", "b", "--prefix", "m/", "--models-dir", str(tmp_path),
                    "--name", "../etc"])  # fmt: skip
    assert code == 2 and "invalid model name" in capsys.readouterr().out


# ------------------------------------------------------------------------ operator side


def catalog_spec() -> Any:
    return parse_catalog(
        {
            "bucket": "asoba-llm-cache",
            "models": {
                "qwen3-14b": {
                    "tier": "production",
                    "s3_prefix": "models/Qwen/Qwen3-14B/",
                    "parameters_b": 14.8,
                    "size_gb": 29.5,
                    "revision": "2025-05-01",
                }
            },
        }
    ).models["qwen3-14b"]


def test_pull_argv_from_settings() -> None:
    settings = Settings.model_validate(
        {
            "s3": {"endpoint_url": "http://10.77.0.1:9000", "pull_read_timeout_s": 7.5},
            "policy": {"disk_margin_gb": 1.5},
        }
    )
    request = pull.pull_request(settings, catalog_spec(), bucket="asoba-llm-cache")
    argv = pull.pull_argv(pull.venv_python(settings), request)
    assert argv == [
        "/opt/asoba-inference/venv/bin/python", "-",
        "--bucket", "asoba-llm-cache",
        "--prefix", "models/Qwen/Qwen3-14B/",
        "--models-dir", "/opt/models",
        "--name", "qwen3-14b",
        "--concurrency", "16",
        "--part-size", str(64 * MIB),
        "--disk-margin-bytes", str(int(1.5 * (1 << 30))),
        "--retries", "4",
        "--progress-interval", "0.5",
        "--read-timeout", "7.5",
        "--revision", "2025-05-01",
        "--endpoint-url", "http://10.77.0.1:9000",
        "--region", "us-west-2",
    ]  # fmt: skip
    # The script's own parser accepts exactly these arguments.
    spec = importlib.util.spec_from_file_location("pull_model_argcheck", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(argv[2:])
    assert args.part_size == 64 * MIB and args.revision == "2025-05-01"
    assert args.read_timeout == 7.5


def test_parse_events() -> None:
    events = [
        pull.parse_event(
            '{"event":"start","name":"m","revision":"r","files":2,"total":10,"to_fetch":10,'
            '"resumed_bytes":0,"staging":"/s","source":"s3://b/p/"}'
        ),
        pull.parse_event(
            '{"event":"progress","bytes":5,"total":10,"fetched":5,"rate_bps":100,'
            '"eta_s":0.05,"files_done":1,"files":2}'
        ),
        pull.parse_event('{"event":"file","path":"a","size":5,"verified_by":"etag-md5"}'),
        pull.parse_event('{"event":"warning","message":"careful"}'),
        pull.parse_event(
            '{"event":"done","status":"pulled","name":"m","revision":"r","path":"/m/r",'
            '"total":10,"files":2,"fetched_bytes":10,"resumed_bytes":0,"elapsed_s":1.0,'
            '"rate_bps":10,"unverified":["a"],"message":"ok","new_field":1}'
        ),
        pull.parse_event('{"event":"error","code":"disk","message":"full","staging":null}'),
    ]
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "PullStarted", "PullProgress", "PullFileVerified", "PullWarning", "PullResult",
        "PullFailed",
    ]  # fmt: skip
    done = events[4]
    assert isinstance(done, pull.PullResult) and done.unverified == ("a",)
    for junk in ("", "hello", "{", "[]", '{"event":"other"}', '{"event":"progress"}'):
        assert pull.parse_event(junk) is None


class CannedExecutor:
    """Answers every command with one canned result, streaming its stdout lines."""

    def __init__(self, stdout: str, exit_code: int = 0) -> None:
        self.stdout = stdout
        self.exit_code = exit_code
        self.calls: list[tuple[list[str], str | None]] = []

    @property
    def target(self) -> str:
        return "canned"

    def run(self, argv: Sequence[str], *, stdin: str | None = None, on_output: Any = None,
            **_: Any) -> CommandResult:  # fmt: skip
        self.calls.append((list(argv), stdin))
        if on_output:
            for line in self.stdout.splitlines():
                on_output(line)
        return CommandResult(" ".join(argv), self.exit_code, self.stdout, "")

    def close(self) -> None:
        return None


REQUEST = pull.PullRequest(bucket="bkt", prefix="m/x/", models_dir="/opt/models", name="x")
DONE = (
    '{"event":"done","status":"present","name":"x","revision":"r1","path":"/opt/models/x/r1",'
    '"total":3,"files":1,"fetched_bytes":0,"resumed_bytes":0,"elapsed_s":0.1,"rate_bps":0,'
    '"unverified":[],"message":"x revision r1 already present"}'
)


def test_run_pull_sends_the_script_on_stdin_and_returns_the_result() -> None:
    executor = CannedExecutor(DONE + "\n")
    seen: list[Any] = []
    result = pull.run_pull(executor, REQUEST, python="/v/bin/python", on_event=seen.append)
    assert result.already_present and result.path == "/opt/models/x/r1"
    assert seen == [result]
    ((argv, stdin),) = executor.calls
    assert argv[:2] == ["/v/bin/python", "-"] and stdin == SCRIPT.read_text()


def test_run_pull_maps_script_errors_to_model_source_errors() -> None:
    line = (
        '{"event":"error","code":"access_denied","message":"listing s3://bkt/m/x/: access '
        'denied (AccessDenied)","staging":null}'
    )
    with pytest.raises(ModelSourceError) as info:
        pull.run_pull(CannedExecutor(line, 3), REQUEST, python="py")
    assert "s3://bkt/m/x/" in str(info.value) and "instance profile" in (info.value.hint or "")

    kept = '{"event":"error","code":"endpoint","message":"down","staging":"/opt/models/x/.s"}'
    with pytest.raises(ModelSourceError) as info:
        pull.run_pull(CannedExecutor(kept, 3), REQUEST, python="py")
    assert "/opt/models/x/.s" in (info.value.hint or "")

    with pytest.raises(RemoteCommandFailed):  # no python on the host: not a source problem
        pull.run_pull(CannedExecutor("", 127), REQUEST, python="py")


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_the_pull_shows_a_bar_on_a_terminal_and_lines_otherwise(terminal: bool) -> None:
    from rich.console import Console

    from deployer.apply_view import ConsoleReporter

    out = io.StringIO()
    reporter = ConsoleReporter(Console(file=out, width=100, force_terminal=terminal))
    reporter.pull(pull.PullStarted("x", "r1", 1, 100 * 2**20, 100 * 2**20, 0, "/s"))
    reporter.pull(pull.PullProgress(50 * 2**20, 100 * 2**20, 50 * 2**20, 10 * 2**20, 5.0, 0, 1))
    reporter.pull(pull.PullWarning("weights/[/]odd key"))  # host text, never markup
    reporter.pull(pull.parse_event(DONE))  # type: ignore[arg-type]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # colours and cursor moves
    assert "weights/[/]odd key" in text and "/opt/models/x/r1" in text
    assert ("━" in text) is terminal  # the bar is drawn only on a terminal
    assert reporter._bar is None  # and stopped when the pull ends


# ---------------------------------------------------------------------------- preflight


@pytest.fixture
def mocked_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with mock_aws():
        client = s3.make_client("us-east-1")
        client.create_bucket(Bucket="asoba-llm-cache")
        yield client


def test_preflight_ok(mocked_s3: Any) -> None:
    mocked_s3.put_object(Bucket="asoba-llm-cache", Key="models/x/config.json", Body=b"{}")
    mocked_s3.put_object(Bucket="asoba-llm-cache", Key="models/x/w.bin", Body=b"abc")
    summary = s3.preflight_source("asoba-llm-cache", "models/x/", client=mocked_s3)
    assert (summary.objects, summary.total_bytes) == (2, 5)
    assert summary.url == "s3://asoba-llm-cache/models/x/"


def test_preflight_missing_prefix_and_bucket(mocked_s3: Any) -> None:
    with pytest.raises(ModelSourceError, match=r"no objects under s3://asoba-llm-cache/models/y/"):
        s3.preflight_source("asoba-llm-cache", "models/y/", client=mocked_s3)
    with pytest.raises(ModelSourceError, match=r"s3://other-bucket/models/y/.*does not exist"):
        s3.preflight_source("other-bucket", "models/y/", client=mocked_s3)


def test_preflight_access_denied() -> None:
    from botocore.exceptions import ClientError

    class Denied:
        def get_paginator(self, name: str) -> Any:
            return self

        def paginate(self, **kw: Any) -> Any:
            raise ClientError(
                {"Error": {"Code": "AccessDenied", "Message": "no"},
                 "ResponseMetadata": {"HTTPStatusCode": 403}},
                "ListObjectsV2",
            )  # fmt: skip

    with pytest.raises(ModelSourceError) as info:
        s3.preflight_source("bkt", "models/z/", client=Denied())
    assert "s3://bkt/models/z/" in str(info.value) and "access denied" in str(info.value)
    assert "s3:GetObject" in (info.value.hint or "")


def test_deployer_pull_imports_no_boto3_eagerly() -> None:
    import subprocess

    code = "import sys, deployer.pull; print('boto3' in sys.modules, 'rich' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]
