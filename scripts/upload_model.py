#!/usr/bin/env python3
"""Upload a model directory to S3 under a prefix (the layout the catalog expects).

    upload_model.py DIR s3://BUCKET/models/NAME/ [--multipart-mb 8]

boto3's transfer manager does the work (multipart above the threshold); credentials and the
endpoint come from the standard chain (AWS_* variables, profile files, AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig


def parse_s3_url(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise SystemExit(f"error: {url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("url", help="s3://bucket/prefix/")
    parser.add_argument("--multipart-mb", type=int, default=8)
    parser.add_argument("--create-bucket", action="store_true")
    args = parser.parse_args()
    bucket, prefix = parse_s3_url(args.url)
    files = sorted(p for p in args.directory.rglob("*") if p.is_file())
    if not files:
        print(f"error: no files under {args.directory}", file=sys.stderr)
        return 1
    s3 = boto3.client("s3")
    if args.create_bucket:
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            region = s3.meta.region_name
            if region and region != "us-east-1":
                s3.create_bucket(
                    Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region}
                )
            else:
                s3.create_bucket(Bucket=bucket)
    mib = 1024 * 1024
    config = TransferConfig(
        multipart_threshold=args.multipart_mb * mib, multipart_chunksize=args.multipart_mb * mib
    )
    total = 0
    for path in files:
        key = prefix + path.relative_to(args.directory).as_posix()
        s3.upload_file(str(path), bucket, key, Config=config)
        total += path.stat().st_size
    print(f"uploaded {len(files)} files, {total / 1e6:.1f} MB to s3://{bucket}/{prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
