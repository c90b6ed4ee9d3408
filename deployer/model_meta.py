"""What a model is, read from its own files in S3 without downloading the weights.

From the model's prefix in the bucket this reads, with a handful of small requests made in
parallel:

* the object listing (every file and its size: what a pull will download);
* ``config.json`` (layers, attention and KV heads, head size, context length, experts);
* ``model.safetensors.index.json`` when the checkpoint is sharded (which files hold weights);
* the header of every weights file, with **ranged GETs**: a safetensors file starts with an
  8-byte little-endian header length N, then N bytes of JSON naming each tensor's dtype, shape
  and byte range. One GET of the first 64 KiB usually covers it; a longer header costs a second
  ranged GET for the rest. The tensor data is never read.

From those headers come the exact parameter count, the stored dtype, and how the parameters
split into embeddings, output head, linear (quantizable) matrices and the rest: what the
estimator needs for every precision. Pre-quantized checkpoints (AWQ/GPTQ ``qweight`` packed
into int32) are counted in logical parameters.

When S3 cannot be read, ``catalog_meta`` builds the same summary from the catalog's
``parameters_b`` and ``size_gb`` and says so; the plan carries that note.

This module is the pure part: parsing headers and ``config.json`` and summing them up. The S3
requests are ``deployer.s3.S3MetadataReader``'s.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from .catalog import ModelSpec, Precision
from .errors import ModelSourceError

GB = 1_000_000_000
HEADER_PROBE_BYTES = 64 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F4": 1,
    "F6_E2M3": 1,
    "F6_E3M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
PRECISION_DTYPE = {
    Precision.bf16: "BF16",
    Precision.fp16: "F16",
    Precision.fp32: "F32",
    Precision.int4: "I4",
}
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)
LM_HEAD_NAMES = ("lm_head.weight", "output.weight", "embed_out.weight")
PACKED_SUFFIXES = (".qweight",)  # AWQ / GPTQ: 4-bit values packed into int32
QUANT_AUX_SUFFIXES = (".qzeros", ".scales", ".g_idx")
#: Fallback assumptions when only the catalog is known (see ``catalog_meta``).
FALLBACK_16BIT_SHARE = 0.05
FALLBACK_MATRIX_SHARE = 0.01
FALLBACK_SHARD_BYTES = 5 * GB  # save_pretrained's long-standing default max_shard_size


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1


def header_length(first8: bytes) -> int:
    if len(first8) < 8:
        raise ModelSourceError("safetensors file shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", first8[:8])
    if length < 2 or length > MAX_HEADER_BYTES:
        raise ModelSourceError(f"safetensors header length {length} is not plausible")
    return int(length)


def parse_header(header: bytes, *, where: str = "safetensors") -> tuple[list[TensorInfo], int]:
    """Tensors of one safetensors header, and the size of its data section in bytes."""
    try:
        data = json.loads(header.decode("utf-8").rstrip(" \x00"))
    except (UnicodeDecodeError, ValueError):
        raise ModelSourceError(f"{where}: header is not JSON") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{where}: header is not a JSON object")
    tensors: list[TensorInfo] = []
    data_end = 0
    for name, entry in data.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelSourceError(f"{where}: tensor {name!r} lacks dtype/shape/offsets") from None
        if end < start or any(d < 0 for d in shape):
            raise ModelSourceError(f"{where}: tensor {name!r} has invalid offsets or shape")
        tensors.append(TensorInfo(name, dtype, shape, end - start))
        data_end = max(data_end, end)
    return tensors, data_end


# --------------------------------------------------------------------------- config.json


class ModelConfig(BaseModel):
    """The parts of ``config.json`` the estimator uses."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str | None = None
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_context: int | None = None
    tie_word_embeddings: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    dtype: str | None = None
    quant_method: str | None = None
    quant_bits: int | None = None
    quant_group_size: int | None = None

    @property
    def ffn_active_size(self) -> int:
        """Width of the feed-forward layer a token actually passes through."""
        if self.num_experts and self.moe_intermediate_size:
            active = self.moe_intermediate_size * (self.experts_per_token or 1)
            return active + (self.shared_expert_intermediate_size or 0)
        return self.intermediate_size or 4 * self.hidden_size


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None


def parse_config(data: Mapping[str, Any], *, where: str = CONFIG_NAME) -> ModelConfig:
    """Normalise a Hugging Face ``config.json`` (decoder LMs; ``text_config`` when nested)."""
    source: Mapping[str, Any] = data
    if _first(data, "hidden_size", "n_embd", "d_model") is None and isinstance(
        data.get("text_config"), Mapping
    ):
        source = data["text_config"]
    hidden = _first(source, "hidden_size", "n_embd", "d_model")
    layers = _first(source, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(source, "num_attention_heads", "n_head")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads)):
        raise ModelSourceError(
            f"{where}: needs positive hidden_size, num_hidden_layers and num_attention_heads"
        )
    kv_heads = _first(source, "num_key_value_heads", "num_kv_heads", "n_head_kv") or heads
    if source.get("multi_query") is True:
        kv_heads = 1
    head_dim = _first(source, "head_dim") or hidden // heads
    quant = data.get("quantization_config") or source.get("quantization_config") or {}
    if not isinstance(quant, Mapping):
        quant = {}
    dtype = _first(source, "dtype", "torch_dtype") or _first(data, "dtype", "torch_dtype")
    try:
        return ModelConfig(
            model_type=_first(source, "model_type") or _first(data, "model_type"),
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=_first(source, "intermediate_size", "ffn_dim", "n_inner"),
            vocab_size=_first(source, "vocab_size"),
            max_context=_first(
                source, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length"
            ),
            tie_word_embeddings=bool(
                _first(source, "tie_word_embeddings")
                if "tie_word_embeddings" in source
                else data.get("tie_word_embeddings", False)
            ),
            num_experts=_first(source, "num_experts", "num_local_experts", "n_routed_experts"),
            experts_per_token=_first(source, "num_experts_per_tok", "moe_topk"),
            moe_intermediate_size=_first(source, "moe_intermediate_size"),
            shared_expert_intermediate_size=_first(source, "shared_expert_intermediate_size"),
            dtype=str(dtype) if dtype else None,
            quant_method=quant.get("quant_method"),
            quant_bits=quant.get("bits") or quant.get("w_bit"),
            quant_group_size=quant.get("group_size") or quant.get("q_group_size"),
        )
    except (ValueError, TypeError) as exc:
        raise ModelSourceError(f"{where}: unexpected values: {exc}") from None


# --------------------------------------------------------------------------- summary


class WeightStats(BaseModel):
    """How a checkpoint's parameters split, which is what each precision's size depends on.

    ``linear_params`` are the 2-D (and fused 3-D expert) weight matrices a quantizer packs;
    embeddings, the output head and 1-D tensors (norms, biases) stay 16-bit under bitsandbytes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    parameters: int
    stored_bytes: int  # bytes of tensor data as stored
    dtype: str  # dominant stored dtype: BF16, F16, F32, or I4 for packed checkpoints
    embedding_params: int
    lm_head_params: int
    linear_params: int
    linear_rows: int  # sum over matrices of numel / last dim (per-row scales of int8)
    largest_matrix_params: int
    other_params: int
    packed: str | None = None  # "awq"/"gptq" when the checkpoint is already 4-bit packed
    tensor_count: int
    exact: bool = True  # False: from the catalog, the split is assumed


def summarize_tensors(
    tensors: Iterable[TensorInfo], *, quant_bits: int = 4, quant_method: str | None = None
) -> WeightStats:
    embedding = lm_head = linear = rows = other = largest = stored = count = 0
    packed = False
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        count += 1
        stored += t.nbytes
        name = t.name
        if name.endswith(PACKED_SUFFIXES) and t.dtype in ("I32", "U32"):
            packed = True
            n = t.numel * (32 // quant_bits)
            linear += n
            rows += n // (t.shape[-1] * (32 // quant_bits)) if t.shape else 0
            largest = max(largest, n)
            continue
        if name.endswith(QUANT_AUX_SUFFIXES) and packed_aux(name, t):
            continue  # scales / zeros / group index: bytes, not parameters
        by_dtype[t.dtype] += t.nbytes
        n = t.numel
        if name.endswith(EMBEDDING_SUFFIXES):
            embedding += n
        elif name in LM_HEAD_NAMES or name.endswith(".lm_head.weight"):
            lm_head += n
        elif len(t.shape) >= 2:
            linear += n
            rows += n // t.shape[-1]
            # one matrix (a fused expert tensor [E, out, in] counts per expert)
            matrix = n // t.shape[0] if len(t.shape) >= 3 else n
            largest = max(largest, matrix)
        else:
            other += n
    if count == 0:
        raise ModelSourceError("the weights files hold no tensors")
    floats = {k: v for k, v in by_dtype.items() if k in FLOAT_DTYPES}
    dtype = max(sorted(floats), key=lambda k: floats[k]) if floats else "unknown"
    method = (quant_method or "awq").lower() if packed else None
    return WeightStats(
        parameters=embedding + lm_head + linear + other,
        stored_bytes=stored,
        dtype="I4" if packed else dtype,
        embedding_params=embedding,
        lm_head_params=lm_head,
        linear_params=linear,
        linear_rows=rows,
        largest_matrix_params=largest,
        other_params=other,
        packed=method,
        tensor_count=count,
    )


def packed_aux(name: str, tensor: TensorInfo) -> bool:
    """A quantizer's side tensor (``scales`` of a packed layer, not e.g. a layer-scale)."""
    return name.endswith((".qzeros", ".g_idx")) or (
        name.endswith(".scales") and len(tensor.shape) == 2
    )


# --------------------------------------------------------------------------- ModelMeta


class ModelMeta(BaseModel):
    """Everything the estimator needs to know about one catalog entry's weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: Literal["s3", "catalog"]
    location: str  # s3://bucket/prefix/
    exists: bool | None  # weights found under the prefix; None: S3 could not be asked
    config: ModelConfig | None
    weights: WeightStats
    download_bytes: int  # what a pull downloads (weights at their stored size + small files)
    largest_shard_bytes: int
    shard_count: int
    notes: list[str] = []
    requests: int = 0  # S3 requests made
    bytes_read: int = 0  # response bytes read (headers, config, index)


def catalog_meta(
    spec: ModelSpec, location: str, reason: str, *, exists: bool | None = None
) -> ModelMeta:
    """The catalog's numbers in the shape of S3 metadata, for when S3 cannot be read.

    Assumed split: ``FALLBACK_16BIT_SHARE`` of the parameters are embeddings/output head (kept
    16-bit by bitsandbytes), the rest quantizable; the largest matrix is
    ``FALLBACK_MATRIX_SHARE`` of the parameters; shards of at most ``FALLBACK_SHARD_BYTES``.
    ``exists`` is False when S3 answered that the prefix holds no weights, None when S3 could
    not be asked.
    """
    params = round(spec.parameters_b * 1e9)
    stored = round(spec.size_gb * GB)
    sixteen = int(params * FALLBACK_16BIT_SHARE)
    linear = params - sixteen
    packed = "awq" if spec.is_prequantized else None
    stats = WeightStats(
        parameters=params,
        stored_bytes=stored,
        dtype=PRECISION_DTYPE.get(spec.precision, "BF16"),
        embedding_params=sixteen,
        lm_head_params=0,
        linear_params=linear,
        linear_rows=linear // 4096 or 1,
        largest_matrix_params=max(int(params * FALLBACK_MATRIX_SHARE), 1),
        other_params=0,
        packed=packed,
        tensor_count=0,
        exact=False,
    )
    return ModelMeta(
        name=spec.name,
        source="catalog",
        location=location,
        exists=exists,
        config=None,
        weights=stats,
        download_bytes=stored,
        largest_shard_bytes=min(stored, FALLBACK_SHARD_BYTES),
        shard_count=max(1, -(-stored // FALLBACK_SHARD_BYTES)),
        notes=[
            f"{reason}; using the catalog's figures ({spec.parameters_b:g}B parameters, "
            f"{spec.size_gb:g} GB)"
        ],
    )


# --------------------------------------------------------------------------- sources


class MetadataSource(Protocol):
    """Where model metadata comes from (S3 in production: ``deployer.s3.S3MetadataReader``)."""

    def read(self, spec: ModelSpec) -> ModelMeta: ...


def weight_files(
    prefix: str, listing: Mapping[str, int], index: Mapping[str, Any] | None
) -> list[str]:
    """The weights files a loader would open: the index's shards, else ``model.safetensors``,
    else every top-level ``*.safetensors`` under the prefix."""
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ModelSourceError(f"{prefix}{INDEX_NAME}: no weight_map")
        names = sorted({str(v) for v in weight_map.values()})
        for name in names:
            if "/" in name or ".." in name:
                raise ModelSourceError(f"{prefix}{INDEX_NAME}: odd shard name {name!r}")
        return [prefix + n for n in names]
    if prefix + SINGLE_NAME in listing:
        return [prefix + SINGLE_NAME]
    return sorted(
        key for key in listing if key.endswith(".safetensors") and "/" not in key[len(prefix) :]
    )
