"""The host-side pull script as a real subprocess against a real moto S3 server.

A multi-file model (one object uploaded in three multipart parts, one with a SHA-256
checksum) is pulled, re-pulled, interrupted with SIGKILL and resumed, corrupted in staging,
deleted and overwritten mid-pull; each time the final directory either holds the verified
model or does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployer.errors import ModelSourceError
from deployer.pull import PullEvent, PullProgress, PullRequest, PullStarted, run_pull
from tests.local_executor import LocalExecutor

SCRIPT = Path(__file__).resolve().parents[2] / "deployer" / "remote" / "pull_model.py"
MIB = 1 << 20
PART = 5 * MIB  # S3's (and moto's) smallest multipart part


@dataclass(frozen=True)
class Moto:
    endpoint: str
    env: dict[str, str]

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield Moto(endpoint, env)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@dataclass
class Model:
    bucket: str
    prefix: str
    files: dict[str, bytes]

    @property
    def total(self) -> int:
        return sum(len(b) for b in self.files.values())


def _data(seed: str, size: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * (1 + 4096 // 32)
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest() * 128
        counter += 1
    return bytes(out[:size])


def _safetensors(seed: str, size: int) -> bytes:
    """A well-formed safetensors file of exactly ``size`` bytes: one U8 tensor fills it."""
    header = b'{"w":{"dtype":"U8","shape":[N],"data_offsets":[0,N]}}'
    n = size - 8 - len(header)
    n -= len(str(n)) * 2 - 2  # "N" twice becomes the digits of n
    header = header.replace(b"N", str(n).encode())
    return len(header).to_bytes(8, "little") + header + _data(seed, n)


@pytest.fixture
def model(moto: Moto) -> Model:
    """A fresh bucket holding a small model: config, tokenizer, a multipart weights file."""
    s3 = moto.client()
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    prefix = "models/demo/"
    s3.create_bucket(Bucket=bucket)
    files = {
        "config.json": b'{"model_type": "qwen2"}\n',
        "tokenizer.json": _data("tok", 300_000),
        "sub/extra.bin": _data("extra", 100_000),
        "model.safetensors": _safetensors("weights", 2 * PART + 700_001),
    }
    s3.put_object(Bucket=bucket, Key=prefix + "config.json", Body=files["config.json"])
    s3.put_object(Bucket=bucket, Key=prefix + "tokenizer.json", Body=files["tokenizer.json"])
    s3.put_object(
        Bucket=bucket,
        Key=prefix + "sub/extra.bin",
        Body=files["sub/extra.bin"],
        ChecksumAlgorithm="SHA256",
    )
    s3.put_object(Bucket=bucket, Key=prefix, Body=b"")  # a "folder" marker: skipped
    key = prefix + "model.safetensors"
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
    data = files["model.safetensors"]
    parts = []
    for number, start in enumerate(range(0, len(data), PART), 1):
        etag = s3.upload_part(
            Bucket=bucket,
            Key=key,
            PartNumber=number,
            UploadId=upload["UploadId"],
            Body=data[start : start + PART],
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    return Model(bucket, prefix, files)


def _argv(model: Model, models_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--bucket", model.bucket,
        "--prefix", model.prefix,
        "--models-dir", str(models_dir),
        "--name", "demo",
        "--progress-interval", "0.1",
        *extra,
    ]  # fmt: skip


def pull(moto: Moto, model: Model, models_dir: Path, *extra: str) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        _argv(model, models_dir, *extra),
        env=moto.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.stderr == "", proc.stderr
    return proc.returncode, events


def last(events: list[dict], kind: str) -> dict:
    found = [e for e in events if e["event"] == kind]
    assert found, events
    return found[-1]


def staging_dirs(models_dir: Path) -> list[Path]:
    return sorted((models_dir / "demo").glob(".staging-*"))


def final_dirs(models_dir: Path) -> list[Path]:
    name_dir = models_dir / "demo"
    return (
        sorted(p for p in name_dir.glob("*") if not p.name.startswith("."))
        if name_dir.exists()
        else []
    )


def assert_landed(path: Path, model: Model) -> dict:
    for rel, data in model.files.items():
        assert (path / rel).read_bytes() == data, rel
    manifest = json.loads((path / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == set(model.files)
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256(model.files[entry["path"]]).hexdigest()
    assert not list(path.rglob("*.json.tmp")) and not (path / ".pull").exists()
    return manifest


def start_slow_pull(
    moto: Moto, model: Model, models_dir: Path, until_bytes: int, *extra: str
) -> tuple[subprocess.Popen[str], list[dict]]:
    """A rate-limited pull, returned once it has reported ``until_bytes``."""
    proc = subprocess.Popen(
        _argv(
            model,
            models_dir,
            "--max-rate",
            "4M",
            "--part-size",
            "256K",
            "--concurrency",
            "2",
            *extra,
        ),
        env=moto.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events: list[dict] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        events.append(event)
        if event["event"] == "progress" and event["bytes"] >= until_bytes:
            return proc, events
        assert event["event"] not in ("done", "error"), events
    raise AssertionError(f"pull ended early: {events}")


def finish(proc: subprocess.Popen[str], events: list[dict]) -> int:
    out, _ = proc.communicate(timeout=60)
    events += [json.loads(line) for line in out.splitlines()]
    return proc.returncode


# ------------------------------------------------------------------------------- the tests


def test_full_pull_lands_verified_and_a_rerun_fetches_nothing(
    moto: Moto, model: Model, tmp_path: Path
) -> None:
    rc, events = pull(moto, model, tmp_path, "--part-size", "1M")
    assert rc == 0, events
    done = last(events, "done")
    assert done["status"] == "pulled"
    assert done["fetched_bytes"] == model.total == done["total"]
    assert done["unverified"] == []
    final = Path(done["path"])
    assert final == tmp_path / "demo" / done["revision"]
    manifest = assert_landed(final, model)
    verified_by = {f["path"]: f["verified_by"] for f in manifest["files"]}
    assert verified_by == {
        "config.json": "etag-md5",
        "tokenizer.json": "etag-md5",
        "sub/extra.bin": "checksum-sha256",
        "model.safetensors": "etag-multipart",
    }
    assert manifest["revision"] == done["revision"]
    assert manifest["source"] == {
        "bucket": model.bucket,
        "prefix": model.prefix,
        "endpoint": moto.endpoint,
    }
    assert staging_dirs(tmp_path) == []
    assert final_dirs(tmp_path) == [final]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["bytes"] == progress[-1]["total"] == model.total
    assert all(set(e) >= {"bytes", "total", "rate_bps", "eta_s"} for e in progress)

    rc, events = pull(moto, model, tmp_path)
    again = last(events, "done")
    assert rc == 0
    assert again["status"] == "present" and again["fetched_bytes"] == 0
    assert again["path"] == done["path"] and "already present" in again["message"]
    assert not [e for e in events if e["event"] in ("start", "progress")]

    # With the catalog's revision the check needs no S3 at all.
    offline = dict(moto.env, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    proc = subprocess.run(
        [*_argv(model, tmp_path), "--revision", done["revision"]],
        env=offline,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0 and '"status":"present"' in proc.stdout

    rc, events = pull(moto, model, tmp_path, "--verify-only")
    assert rc == 0 and last(events, "done")["status"] == "verified"
    (final / "tokenizer.json").write_bytes(b"x" * len(model.files["tokenizer.json"]))
    rc, events = pull(moto, model, tmp_path, "--verify-only")
    assert rc == 5 and last(events, "error")["code"] == "corrupt"
    assert "tokenizer.json" in last(events, "error")["message"]


def test_catalog_revision_names_the_directory(moto: Moto, model: Model, tmp_path: Path) -> None:
    rc, events = pull(moto, model, tmp_path, "--revision", "v1.2")
    assert rc == 0
    assert last(events, "done")["path"] == str(tmp_path / "demo" / "v1.2")
    assert_landed(tmp_path / "demo" / "v1.2", model)


def test_killed_pull_keeps_staging_and_resumes(moto: Moto, model: Model, tmp_path: Path) -> None:
    proc, events = start_slow_pull(moto, model, tmp_path, until_bytes=int(1.5 * MIB))
    proc.kill()
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(staging_dirs(tmp_path)) == 1
    assert final_dirs(tmp_path) == []

    rc, events = pull(moto, model, tmp_path)
    assert rc == 0, events
    start, done = last(events, "start"), last(events, "done")
    assert start["resumed_bytes"] > 0
    assert done["resumed_bytes"] == start["resumed_bytes"]
    assert 0 < done["fetched_bytes"] < model.total
    assert done["fetched_bytes"] + done["resumed_bytes"] == model.total
    assert_landed(Path(done["path"]), model)
    assert staging_dirs(tmp_path) == []


def test_corrupt_staged_data_is_detected_removed_and_refetched(
    moto: Moto, model: Model, tmp_path: Path
) -> None:
    proc, _ = start_slow_pull(moto, model, tmp_path, until_bytes=int(1.5 * MIB))
    proc.kill()
    proc.communicate(timeout=10)
    (staging,) = staging_dirs(tmp_path)
    journal = json.loads((staging / ".pull" / "model.safetensors.json").read_text())
    assert journal["done"] and journal["verified"] is None
    chunk = journal["done"][0]
    with (staging / "model.safetensors").open("r+b") as fh:  # flip bytes of a finished chunk
        fh.seek(chunk * journal["chunk_size"] + 10)
        fh.write(b"\x00CORRUPT\x00")

    rc, events = pull(moto, model, tmp_path)
    error = last(events, "error")
    assert rc == 5 and error["code"] == "corrupt", events
    assert "model.safetensors" in error["message"]
    assert final_dirs(tmp_path) == []
    assert not (staging / "model.safetensors").exists()
    assert not (staging / ".pull" / "model.safetensors.json").exists()

    rc, events = pull(moto, model, tmp_path)
    assert rc == 0, events
    assert_landed(Path(last(events, "done")["path"]), model)


@pytest.mark.parametrize("change", ["delete", "overwrite"])
def test_objects_changing_mid_pull_fail_cleanly(
    moto: Moto, model: Model, tmp_path: Path, change: str
) -> None:
    proc, events = start_slow_pull(moto, model, tmp_path, until_bytes=MIB)
    s3 = moto.client()
    key = model.prefix + "model.safetensors"
    if change == "delete":
        s3.delete_object(Bucket=model.bucket, Key=key)
    else:
        s3.put_object(Bucket=model.bucket, Key=key, Body=b"a different model")
    rc = finish(proc, events)
    error = last(events, "error")
    assert rc == 3, events
    assert error["code"] == "changed"
    assert "model.safetensors" in error["message"]
    assert error["staging"] and Path(error["staging"]).is_dir()
    assert final_dirs(tmp_path) == []


def test_missing_prefix_is_a_clear_error(moto: Moto, model: Model, tmp_path: Path) -> None:
    missing = Model(model.bucket, "models/nothing-here/", {})
    rc, events = pull(moto, missing, tmp_path)
    error = last(events, "error")
    assert rc == 3 and error["code"] == "not_found"
    assert f"s3://{model.bucket}/models/nothing-here/" in error["message"]
    assert not (tmp_path / "demo").exists()

    rc, events = pull(moto, Model("no-such-bucket-here", model.prefix, {}), tmp_path)
    assert rc == 3 and last(events, "error")["code"] == "not_found"
    assert "no-such-bucket-here" in last(events, "error")["message"]


def test_not_enough_disk_fails_before_fetching(moto: Moto, model: Model, tmp_path: Path) -> None:
    rc, events = pull(moto, model, tmp_path, "--disk-margin-bytes", "1000T")
    error = last(events, "error")
    assert rc == 4 and error["code"] == "disk"
    assert "not enough free disk" in error["message"] and "margin" in error["message"]
    assert [e["event"] for e in events] == ["error"]
    assert staging_dirs(tmp_path) == [] and final_dirs(tmp_path) == []


def test_unreachable_endpoint(moto: Moto, model: Model, tmp_path: Path) -> None:
    rc, events = pull(moto, model, tmp_path, "--endpoint-url", f"http://127.0.0.1:{_free_port()}")
    assert rc == 3 and last(events, "error")["code"] == "endpoint"


def test_a_second_pull_of_the_same_model_is_refused(
    moto: Moto, model: Model, tmp_path: Path
) -> None:
    proc, events = start_slow_pull(moto, model, tmp_path, until_bytes=256 * 1024)
    try:
        rc, second = pull(moto, model, tmp_path)
        assert rc == 6 and last(second, "error")["code"] == "busy"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = finish(proc, events)
    assert rc == 130 and last(events, "error")["code"] == "interrupted"
    assert len(staging_dirs(tmp_path)) == 1 and final_dirs(tmp_path) == []


def test_run_pull_through_an_executor(
    moto: Moto, model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator side: argv + script on stdin through an executor, events to a callback."""
    for key, value in moto.env.items():
        monkeypatch.setenv(key, value)
    request = PullRequest(
        bucket=model.bucket,
        prefix=model.prefix,
        models_dir=str(tmp_path),
        name="demo",
        endpoint_url=moto.endpoint,
        part_size=MIB,
        disk_margin_bytes=0,
        progress_interval=0.1,
    )
    seen: list[PullEvent] = []
    executor = LocalExecutor()
    result = run_pull(executor, request, python=sys.executable, on_event=seen.append)
    assert result.status == "pulled" and result.total == model.total
    assert_landed(Path(result.path), model)
    assert isinstance(seen[0], PullStarted)
    assert any(isinstance(e, PullProgress) for e in seen)
    assert seen[-1] == result
    (call,) = executor.calls
    assert call.argv[:2] == (sys.executable, "-") and call.stdin == SCRIPT.read_text()

    missing = PullRequest(**{**request.__dict__, "prefix": "models/absent/"})
    with pytest.raises(ModelSourceError) as info:
        run_pull(executor, missing, python=sys.executable)
    assert f"s3://{model.bucket}/models/absent/" in str(info.value)
    assert info.value.hint and "s3_prefix" in info.value.hint


def test_a_staged_file_changed_after_verification_is_not_landed(
    moto: Moto, model: Model, tmp_path: Path
) -> None:
    """Tampering with a verified staged file between two runs (same size, other bytes): the
    resumed pull notices (inode, size, mtime), fetches the file again and lands the original."""
    proc = subprocess.Popen(
        _argv(model, tmp_path, "--max-rate", "2M", "--part-size", "256K", "--concurrency", "1"),
        env=moto.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    verified: str | None = None
    for line in proc.stdout:
        event = json.loads(line)
        assert event["event"] not in ("done", "error"), event
        if event["event"] == "file":
            verified = event["path"]
            break
    proc.kill()
    proc.communicate(timeout=10)
    assert verified is not None
    (staging,) = staging_dirs(tmp_path)
    staged = staging / verified
    original = staged.read_bytes()
    time.sleep(0.01)  # a later mtime, whatever the filesystem's resolution
    staged.write_bytes(bytes(b ^ 0xFF for b in original[:16]) + original[16:])

    rc, events = pull(moto, model, tmp_path)
    assert rc == 0, events
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any(f"{verified}: the staged file changed after it was verified" in w for w in warnings)
    assert_landed(Path(last(events, "done")["path"]), model)
