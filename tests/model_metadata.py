"""Model metadata for tests: a ``MetadataSource`` over ready-made metadata, and ``ModelMeta``
from tensors already in hand (the same arithmetic as reading the headers from S3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deployer.catalog import ModelSpec
from deployer.model_meta import (
    ModelMeta,
    TensorInfo,
    catalog_meta,
    parse_config,
    summarize_tensors,
)


class StaticMetadata:
    """A ``MetadataSource`` over ready-made metadata (tests); unknown names fall
    back to the catalog's figures like an unreachable S3."""

    def __init__(self, metas: Mapping[str, ModelMeta], *, bucket: str = "bucket") -> None:
        self.metas = dict(metas)
        self.bucket = bucket

    def read(self, spec: ModelSpec) -> ModelMeta:
        if spec.name in self.metas:
            return self.metas[spec.name]
        return catalog_meta(spec, f"s3://{self.bucket}/{spec.s3_prefix}", "metadata not available")


def meta_from_tensors(
    spec: ModelSpec,
    config: Mapping[str, Any] | None,
    shards: Sequence[Sequence[TensorInfo]],
    *,
    location: str | None = None,
) -> ModelMeta:
    """``ModelMeta`` from tensors already in hand (the arithmetic of
    ``S3MetadataReader.read_s3``)."""
    parsed = parse_config(config) if config is not None else None
    tensors = [t for shard in shards for t in shard]
    stats = summarize_tensors(
        tensors,
        quant_bits=(parsed.quant_bits if parsed and parsed.quant_bits else 4),
        quant_method=parsed.quant_method if parsed else None,
    )
    sizes = [sum(t.nbytes for t in shard) for shard in shards]
    return ModelMeta(
        name=spec.name,
        source="s3",
        location=location or f"s3://bucket/{spec.s3_prefix}",
        exists=True,
        config=parsed,
        weights=stats,
        download_bytes=sum(sizes),
        largest_shard_bytes=max(sizes),
        shard_count=len(shards),
    )
