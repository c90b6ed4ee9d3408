#!/usr/bin/env python3
"""Pull throughput on the sandbox host, and the time of a no-op re-deploy.

Same run, interleaved: the deployer's pull (``deployer/remote/pull_model.py``: parallel ranged
GETs across and within files) against a baseline of boto3's ``download_file`` with its default
transfer settings, one file after another — what a hand-written script does. Both run on the
host, with the service venv's Python and boto3, from the sandbox's S3 endpoint, into fresh
directories. Then ``deploy-model demo-tiny`` is timed when it is already deployed (a no-op).

    make sandbox && source .sandbox/env
    python scripts/bench_pull.py --files 4 --file-mb 256 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployer.catalog import load_catalog  # noqa: E402
from deployer.config import load_settings  # noqa: E402
from deployer.make_plan import open_host  # noqa: E402
from deployer.pull import PullRequest, run_pull  # noqa: E402

PREFIX = "bench/pull-model/"
BASELINE = """
import sys, time, boto3
bucket, prefix, dest = sys.argv[1:4]
s3 = boto3.client("s3")
pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
for key in sorted(keys):
    s3.download_file(bucket, key, dest + "/" + key[len(prefix):])
"""


def upload(directory: Path, bucket: str) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "upload_model.py"),
            str(directory),
            f"s3://{bucket}/{PREFIX}",
            "--multipart-mb",
            "64",
        ],
        check=True,
    )


def safetensors_header(size: int) -> tuple[bytes, int]:
    """The header of a well-formed safetensors file of ``size`` bytes holding one U8 tensor
    (the pull checks that a file's tensors exactly fill it), and that tensor's length."""
    n = size
    for _ in range(3):
        meta = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
        n = size - 8 - len(meta)
    return len(meta).to_bytes(8, "little") + meta, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--file-mb", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    settings = load_settings()
    bucket = settings.s3.bucket or load_catalog(settings.catalog).bucket
    total = args.files * args.file_mb * 1024 * 1024

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.files):
            with open(Path(tmp) / f"model-{i + 1:05d}.safetensors", "wb") as fh:
                header, n = safetensors_header(args.file_mb * 1024 * 1024)
                fh.write(header)
                while n > 0:
                    fh.write(os.urandom(min(n, 1024 * 1024)))
                    n -= 1024 * 1024
        upload(Path(tmp), bucket)

    host = open_host(settings)
    venv_python = f"{settings.remote.service_dir}/venv/bin/python"
    if not host.run(["test", "-x", venv_python], check=False).ok:
        print("deploy demo-tiny first (the bench uses the service venv's boto3)", file=sys.stderr)
        return 1
    scratch = "/var/tmp/bench-pull"
    env = {"AWS_ENDPOINT_URL": settings.s3.endpoint_url} if settings.s3.endpoint_url else None
    ours: list[float] = []
    base: list[float] = []
    for rep in range(args.reps):
        host.run(["rm", "-rf", scratch], sudo=True)
        host.run(["mkdir", "-p", f"{scratch}/base", f"{scratch}/ours"])
        started = time.perf_counter()
        host.run([venv_python, "-", bucket, PREFIX, f"{scratch}/base"], stdin=BASELINE, env=env)
        base.append(time.perf_counter() - started)
        request = PullRequest(
            bucket=bucket,
            prefix=PREFIX,
            models_dir=f"{scratch}/ours",
            name="bench",
            endpoint_url=settings.s3.endpoint_url,
            region=settings.s3.region,
            concurrency=args.concurrency,
            disk_margin_bytes=0,
        )
        started = time.perf_counter()
        result = run_pull(host, request, python=venv_python)
        ours.append(time.perf_counter() - started)
        assert result.fetched_bytes == total, result
        print(f"rep {rep + 1}: baseline {base[-1]:.2f}s, ours {ours[-1]:.2f}s", flush=True)
    host.run(["rm", "-rf", scratch], sudo=True)

    noop: list[float] = []
    for _ in range(args.reps):
        started = time.perf_counter()
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("deploy-model")), "demo-tiny"],
            capture_output=True,
            text=True,
            check=False,
        )
        noop.append(time.perf_counter() - started)
        if proc.returncode != 0 or "nothing changed" not in proc.stdout:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            return 1

    mb = total / 1e6
    b, o, n = statistics.median(base), statistics.median(ours), statistics.median(noop)
    print()
    print(f"| way ({args.files} files, {mb:.0f} MB, median of {args.reps}) | time | MB/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| boto3 `download_file`, file after file (defaults) | {b:.2f} s | {mb / b:.0f} | 1.00x |"
    )
    print(
        f"| deployer pull ({args.concurrency} ranged GETs, verified) | {o:.2f} s | {mb / o:.0f} "
        f"| {b / o:.2f}x |"
    )
    print(f"| no-op re-deploy of demo-tiny (whole command) | {n:.2f} s | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
