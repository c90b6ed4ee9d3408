"""The estimator's arithmetic, and reading model metadata from S3 with ranged GETs (moto)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from deployer.catalog import ModelSpec, load_catalog
from deployer.config import PolicyConfig, S3Config
from deployer.errors import ModelSourceError
from deployer.estimate import CUDA_CONTEXT_BYTES, estimate, weight_bytes
from deployer.model_meta import (
    TensorInfo,
    catalog_meta,
    header_length,
    parse_config,
    parse_header,
    summarize_tensors,
)
from deployer.s3 import S3MetadataReader, client_for
from tests import model_shapes as ms
from tests.model_metadata import meta_from_tensors

CATALOG = load_catalog()
BUCKET = "asoba-llm-cache"
GB = 1_000_000_000


def meta(name: str):  # type: ignore[no-untyped-def]
    return meta_from_tensors(CATALOG.models[name], ms.config(name), ms.model_shards(name))


# --------------------------------------------------------------------------- shapes -> counts


@pytest.mark.parametrize(
    ("name", "params_b", "stored_gb"),
    [
        ("qwen3-14b", 14.768, 29.54),  # published: 14.8B, 29.5 GB of bf16 safetensors
        ("qwen3-14b-awq", 14.768, 9.98),  # published AWQ checkpoint: 9.97 GB
        ("qwen3-coder-30b", 30.532, 61.06),  # 30.5B total, 3.3B active
        ("deepseek-r1-8b", 8.030, 16.06),  # 8.03B
        ("mistral_policy_analysis", 0.150, 0.30),  # catalog: 0.149B, 0.298 GB
    ],
)
def test_parameter_count_and_size_from_headers(
    name: str, params_b: float, stored_gb: float
) -> None:
    m = meta(name)
    assert m.weights.parameters / 1e9 == pytest.approx(params_b, abs=0.001)
    assert m.weights.stored_bytes / GB == pytest.approx(stored_gb, abs=0.01)
    spec = CATALOG.models[name]
    assert m.weights.parameters / 1e9 == pytest.approx(spec.parameters_b, rel=0.02)


def test_awq_checkpoint_counts_logical_parameters() -> None:
    m = meta("qwen3-14b-awq")
    assert m.weights.packed == "awq" and m.weights.dtype == "I4"
    assert m.weights.parameters == meta("qwen3-14b").weights.parameters


def test_config_parsing_for_dense_and_moe() -> None:
    dense = parse_config(ms.config("qwen3-14b"))
    assert (dense.num_layers, dense.num_kv_heads, dense.head_dim) == (40, 8, 128)
    assert dense.max_context == 40960 and dense.ffn_active_size == 17408
    moe = parse_config(ms.config("qwen3-coder-30b"))
    assert moe.num_experts == 128 and moe.experts_per_token == 8
    assert moe.ffn_active_size == 8 * 768
    awq = parse_config(ms.config("qwen3-14b-awq"))
    assert (awq.quant_method, awq.quant_bits, awq.quant_group_size) == ("awq", 4, 128)
    llama = parse_config(ms.config("deepseek-r1-8b"))
    assert llama.head_dim == 128  # from hidden / heads when head_dim is absent
    with pytest.raises(ModelSourceError, match="hidden_size"):
        parse_config({"model_type": "x"})


def test_nested_text_config() -> None:
    cfg = parse_config({"model_type": "llava", "text_config": ms.config("deepseek-r1-8b")})
    assert cfg.num_layers == 32


# --------------------------------------------------------------------------- formulas


def test_precision_formulas() -> None:
    m = meta("qwen3-14b")
    w = m.weights
    sixteen = 2 * (w.parameters - w.linear_params)
    assert weight_bytes(m, "none") == 2 * w.parameters
    assert weight_bytes(m, "bnb-8bit") == w.linear_params + 4 * w.linear_rows + sixteen
    nf4 = weight_bytes(m, "bnb-4bit") - sixteen
    assert nf4 * 8 / w.linear_params == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-4)
    # embeddings and lm_head stay 16-bit: 2 x 151936 x 5120 x 2 bytes
    assert sixteen >= 2 * 151936 * 5120 * 2
    awq = meta("qwen3-14b-awq")
    assert weight_bytes(awq, "awq") == awq.weights.stored_bytes
    # AWQ's group-128 scales/zeros: a little above 4 bits per matrix parameter
    bits = (awq.weights.stored_bytes - sixteen) * 8 / awq.weights.linear_params
    assert 4.1 < bits < 4.2
    with pytest.raises(ValueError):
        weight_bytes(awq, "bnb-4bit")
    with pytest.raises(ValueError):
        weight_bytes(m, "awq")


def test_kv_cache_and_context_cap() -> None:
    est = estimate(meta("qwen3-14b"), CATALOG.models["qwen3-14b"], PolicyConfig())
    per_token = 2 * 40 * 8 * 128 * 2
    assert est.kv_bytes_per_token == per_token
    assert est.needs["none"].kv_cache_bytes == per_token * 4096 * 4
    # the policy asks for more context than the model has: capped by config.json
    small = estimate(
        meta("mistral_policy_analysis"),
        CATALOG.models["mistral_policy_analysis"],
        PolicyConfig(context_tokens=65536, concurrent_seqs=2),
    )
    assert small.context_tokens == 8192
    assert small.needs["none"].kv_cache_bytes == 2 * 16 * 4 * 64 * 2 * 8192 * 2


def test_need_is_the_sum_of_its_parts_and_bnb_pays_a_dequant_buffer() -> None:
    est = estimate(meta("deepseek-r1-8b"), CATALOG.models["deepseek-r1-8b"], PolicyConfig())
    for need in est.needs.values():
        assert need.gpu_bytes == (
            need.weights_bytes + need.kv_cache_bytes + need.activation_bytes + need.runtime_bytes
        )
    assert est.needs["none"].runtime_bytes == CUDA_CONTEXT_BYTES
    assert est.needs["bnb-4bit"].runtime_bytes == CUDA_CONTEXT_BYTES + 2 * 14336 * 4096
    assert (
        est.needs["none"].gpu_bytes
        > est.needs["bnb-8bit"].gpu_bytes
        > est.needs["bnb-4bit"].gpu_bytes
    )


@pytest.mark.parametrize(
    ("name", "quant", "low", "high"),
    [
        ("deepseek-r1-8b", "none", 18.5, 20.0),  # under quantize_above_gb: runs unquantized
        ("qwen3-14b", "none", 32.0, 35.0),  # 28 GB of weights do not fit 24 GB
        ("qwen3-14b", "bnb-4bit", 13.0, 15.5),
        ("qwen3-14b-awq", "awq", 13.0, 15.5),
        ("qwen3-coder-30b", "bnb-4bit", 18.0, 21.0),
        ("mistral_policy_analysis", "none", 1.0, 2.0),
    ],
)
def test_gpu_needs_of_catalog_models(name: str, quant: str, low: float, high: float) -> None:
    est = estimate(meta(name), CATALOG.models[name], PolicyConfig())
    assert low <= est.needs[quant].gpu_bytes / GB <= high


def test_ram_need_is_baseline_plus_twice_the_largest_shard() -> None:
    m = meta("qwen3-14b")
    est = estimate(m, CATALOG.models["qwen3-14b"], PolicyConfig())
    assert est.needs["none"].ram_bytes == 2 * 1024**3 + 2 * m.largest_shard_bytes
    assert est.needs["none"].disk_bytes == m.download_bytes == m.weights.stored_bytes


def test_catalog_fallback_is_marked_and_approximate() -> None:
    spec = CATALOG.models["deepseek-r1-8b"]
    fallback = catalog_meta(spec, "s3://b/models/deepseek-r1-8b/", "metadata not read: timeout")
    est = estimate(fallback, spec, PolicyConfig())
    assert est.source == "catalog" and not est.exact and est.exists is None
    assert "catalog" in est.notes[0] and "timeout" in est.notes[0]
    assert est.parameters == 8_030_000_000
    # shards assumed at save_pretrained's 5 GB: loading needs 2 of them in RAM, not 16 GB x 2
    assert fallback.largest_shard_bytes == 5 * GB and fallback.shard_count == 4
    # close to the metadata-based figure, on the safe side for the KV cache
    exact = estimate(meta("deepseek-r1-8b"), spec, PolicyConfig())
    assert est.kv_bytes_per_token >= exact.kv_bytes_per_token
    assert est.needs["none"].gpu_bytes / exact.needs["none"].gpu_bytes == pytest.approx(1, abs=0.05)


# --------------------------------------------------------------------------- safetensors


def test_header_parsing() -> None:
    items = [TensorInfo("a.weight", "BF16", (4, 8), 64), TensorInfo("b", "F32", (3,), 12)]
    raw = ms.full_file(items)
    n = header_length(raw[:8])
    tensors, data_end = parse_header(raw[8 : 8 + n])
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in tensors] == [
        ("a.weight", "BF16", (4, 8), 64),
        ("b", "F32", (3,), 12),
    ]
    assert data_end == 76 and len(raw) == 8 + n + data_end
    for bad in (b"\x01\x00", struct.pack("<Q", 1), struct.pack("<Q", 2**40)):
        with pytest.raises(ModelSourceError):
            header_length(bad)
    with pytest.raises(ModelSourceError, match="not JSON"):
        parse_header(b"{nope")
    with pytest.raises(ModelSourceError, match="lacks"):
        parse_header(b'{"x": {"dtype": "F16"}}')


def test_summary_split() -> None:
    stats = summarize_tensors(ms.tensors(ms.config("deepseek-r1-8b")))
    assert stats.embedding_params == stats.lm_head_params == 128256 * 4096
    assert stats.largest_matrix_params == 14336 * 4096
    assert stats.other_params == (2 * 32 + 1) * 4096
    assert stats.dtype == "BF16"


# --------------------------------------------------------------------------- S3 (moto)


class RecordingClient:
    """Wraps a boto3 client; records every GetObject's key and Range."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.gets: list[tuple[str, str | None]] = []

    def get_object(self, **kwargs: Any) -> Any:
        self.gets.append((kwargs["Key"], kwargs.get("Range")))
        return self._client.get_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-west-2")
        client.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
        )
        yield client


def _spec(name: str, prefix: str | None = None) -> ModelSpec:
    spec = CATALOG.models[name]
    return spec.model_copy(update={"s3_prefix": prefix}) if prefix else spec


@pytest.mark.parametrize("name", ["qwen3-14b", "qwen3-coder-30b", "qwen3-14b-awq"])
def test_s3_metadata_equals_the_local_computation(moto_s3: Any, name: str) -> None:
    spec = CATALOG.models[name]
    ms.upload(moto_s3, BUCKET, spec.s3_prefix, name)
    client = RecordingClient(client_for(S3Config()))
    got = S3MetadataReader(client, BUCKET).read(spec)
    want = meta(name)
    assert got.source == "s3" and got.exists is True and got.notes == []
    assert got.weights == want.weights
    assert got.config == want.config
    assert got.shard_count == len(ms.model_shards(name))
    # the headers claim the full shard sizes: that is what a pull would download
    assert got.download_bytes >= want.weights.stored_bytes
    # every weights file was read with ranged GETs only, never whole
    for key, byte_range in client.gets:
        if key.endswith(".safetensors"):
            assert byte_range is not None and byte_range.startswith("bytes=")
    shard_gets = [g for g in client.gets if g[0].endswith(".safetensors")]
    assert len(shard_gets) >= got.shard_count
    assert got.bytes_read < 4_000_000  # headers only: a few hundred KB per shard at most


def test_long_header_takes_a_second_ranged_get(moto_s3: Any) -> None:
    spec = CATALOG.models["qwen3-coder-30b"]  # 18k expert tensors: headers over 64 KiB
    ms.upload(moto_s3, BUCKET, spec.s3_prefix, "qwen3-coder-30b")
    client = RecordingClient(client_for(S3Config()))
    S3MetadataReader(client, BUCKET).read(spec)
    ranges = [r for k, r in client.gets if k.endswith("00001-of-00013.safetensors")]
    assert ranges[0] == "bytes=0-65535" and len(ranges) == 2
    assert ranges[1] is not None and ranges[1].startswith("bytes=65536-")


def test_single_file_checkpoint_without_index(moto_s3: Any) -> None:
    items = [
        TensorInfo("model.embed_tokens.weight", "F32", (64, 16), 64 * 16 * 4),
        TensorInfo("model.layers.0.mlp.up_proj.weight", "F32", (32, 16), 32 * 16 * 4),
        TensorInfo("model.norm.weight", "F32", (16,), 64),
    ]
    raw = ms.full_file(items)
    moto_s3.put_object(Bucket=BUCKET, Key="models/tiny/model.safetensors", Body=raw)
    config = json.dumps(
        {
            "model_type": "llama",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 128,
            "tie_word_embeddings": True,
        }
    ).encode()
    moto_s3.put_object(Bucket=BUCKET, Key="models/tiny/config.json", Body=config)
    got = S3MetadataReader(client_for(S3Config()), BUCKET).read(_spec("demo-tiny", "models/tiny/"))
    assert got.source == "s3" and got.weights.parameters == 64 * 16 + 32 * 16 + 16
    assert got.weights.dtype == "F32" and got.download_bytes == len(raw) + len(config)
    # the estimate of the stored weights matches the real file within 5%
    est = estimate(got, _spec("demo-tiny", "models/tiny/"), PolicyConfig())
    assert est.stored_bytes == pytest.approx(len(raw), rel=0.05)


def test_missing_model_falls_back_to_the_catalog_and_says_so(moto_s3: Any) -> None:
    got = S3MetadataReader(client_for(S3Config()), BUCKET).read(CATALOG.models["qwen3-14b"])
    assert got.source == "catalog" and got.exists is False
    assert "no safetensors weights under s3://asoba-llm-cache/models/qwen3-14b/" in got.notes[0]
    assert "catalog" in got.notes[0]


def test_unreachable_endpoint_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value-123")
    client = client_for(S3Config(endpoint_url="http://127.0.0.1:9"))
    got = S3MetadataReader(client, BUCKET).read(CATALOG.models["deepseek-r1-8b"])
    assert got.source == "catalog"
    assert "metadata not read from S3" in got.notes[0]
    assert "secret-value-123" not in got.notes[0]


def test_corrupt_header_falls_back(moto_s3: Any) -> None:
    moto_s3.put_object(
        Bucket=BUCKET,
        Key="models/deepseek-r1-8b/model.safetensors",
        Body=struct.pack("<Q", 50) + b"{broken",
    )
    got = S3MetadataReader(client_for(S3Config()), BUCKET).read(CATALOG.models["deepseek-r1-8b"])
    assert got.source == "catalog" and "ends inside its header" in got.notes[0]


def test_the_real_demo_checkpoint_layout_with_a_tiny_model(moto_s3: Any, tmp_path: Path) -> None:
    """A checkpoint written by the safetensors library itself (not our header writer)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shards = [
        {
            "model.embed_tokens.weight": rng.standard_normal((256, 32), dtype=np.float32),
            "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32), np.float32),
        },
        {
            "model.layers.0.mlp.down_proj.weight": rng.standard_normal((32, 64), np.float32),
            "model.norm.weight": np.ones(32, np.float32),
            "lm_head.weight": rng.standard_normal((256, 32), dtype=np.float32),
        },
    ]
    weight_map = {}
    total = 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        path = tmp_path / name
        save_file(tensors, str(path))
        moto_s3.put_object(Bucket=BUCKET, Key=f"models/t2/{name}", Body=path.read_bytes())
        weight_map |= dict.fromkeys(tensors, name)
        total += path.stat().st_size
    index = json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode()
    moto_s3.put_object(Bucket=BUCKET, Key="models/t2/model.safetensors.index.json", Body=index)
    spec = _spec("demo-tiny", "models/t2/")
    got = S3MetadataReader(client_for(S3Config()), BUCKET).read(spec)
    assert got.source == "s3" and got.shard_count == 2
    assert got.weights.parameters == 256 * 32 * 2 + 32 * 32 + 32 * 64 + 32
    assert got.weights.stored_bytes == pytest.approx(total, rel=0.05)
    assert got.download_bytes == total + len(index)
    assert any("total_size" in n for n in got.notes)  # the index lied; the headers win
    assert any("config.json" in n for n in got.notes)
