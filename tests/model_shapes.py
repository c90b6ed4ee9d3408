"""Synthetic checkpoints: the real models' tensor layout, with headers but without weights.

``tensors(config)`` lays out every tensor of a Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE
decoder from its config.json (``tests/data/models/<name>/config.json``), as the
Hugging Face implementation names them; AWQ configs get packed ``qweight``/``qzeros``/``scales``.
``shard`` splits them like ``save_pretrained`` (5 GB shards), ``header_only_file`` writes a
safetensors file that is just its header (the data section is claimed, not present), and
``upload`` puts such a metadata-only checkpoint into an S3 bucket.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from deployer.model_meta import DTYPE_BYTES, TensorInfo

DATA = Path(__file__).resolve().parent / "data" / "models"
SHARD_BYTES = 5_000_000_000
MODELS = (
    "mistral_policy_analysis",
    "mistral_iac_generation",
    "qwen3-14b",
    "qwen3-14b-awq",
    "qwen3-coder-30b",
    "deepseek-r1-8b",
)


@cache
def config(name: str) -> dict[str, Any]:
    return json.loads((DATA / name / "config.json").read_text())


def _t(name: str, dtype: str, *shape: int) -> TensorInfo:
    numel = 1
    for d in shape:
        numel *= d
    return TensorInfo(name, dtype, tuple(shape), numel * DTYPE_BYTES[dtype])


def tensors(cfg: dict[str, Any]) -> list[TensorInfo]:
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    mtype = cfg["model_type"]
    quant = cfg.get("quantization_config") or {}
    awq = quant.get("quant_method") == "awq"
    group = quant.get("group_size", 128)
    dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[cfg["torch_dtype"]]

    def linear(name: str, out: int, inp: int) -> list[TensorInfo]:
        if not awq:
            return [_t(name + ".weight", dtype, out, inp)]
        return [
            _t(name + ".qweight", "I32", inp, out // 8),
            _t(name + ".qzeros", "I32", inp // group, out // 8),
            _t(name + ".scales", "F16", inp // group, out),
        ]

    out = [_t("model.embed_tokens.weight", dtype, vocab, h)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            _t(f"{p}.input_layernorm.weight", dtype, h),
            _t(f"{p}.post_attention_layernorm.weight", dtype, h),
        ]
        out += linear(f"{p}.self_attn.q_proj", heads * hd, h)
        out += linear(f"{p}.self_attn.k_proj", kv * hd, h)
        out += linear(f"{p}.self_attn.v_proj", kv * hd, h)
        out += linear(f"{p}.self_attn.o_proj", h, heads * hd)
        if mtype.startswith("qwen3"):
            out += [
                _t(f"{p}.self_attn.q_norm.weight", dtype, hd),
                _t(f"{p}.self_attn.k_norm.weight", dtype, hd),
            ]
        if mtype == "qwen2":
            out += [
                _t(f"{p}.self_attn.{x}_proj.bias", dtype, n)
                for x, n in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd))
            ]
        if cfg.get("num_experts"):
            e, mi = cfg["num_experts"], cfg["moe_intermediate_size"]
            out.append(_t(f"{p}.mlp.gate.weight", dtype, e, h))
            for j in range(e):
                q = f"{p}.mlp.experts.{j}"
                out += linear(f"{q}.gate_proj", mi, h) + linear(f"{q}.up_proj", mi, h)
                out += linear(f"{q}.down_proj", h, mi)
        else:
            inter = cfg["intermediate_size"]
            out += linear(f"{p}.mlp.gate_proj", inter, h) + linear(f"{p}.mlp.up_proj", inter, h)
            out += linear(f"{p}.mlp.down_proj", h, inter)
    out.append(_t("model.norm.weight", dtype, h))
    if not cfg.get("tie_word_embeddings", False):
        out.append(_t("lm_head.weight", dtype, vocab, h))
    return out


def shard(items: Sequence[TensorInfo], max_bytes: int = SHARD_BYTES) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in items:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


@cache
def model_shards(name: str) -> list[list[TensorInfo]]:
    return shard(tensors(config(name)))


def header_bytes(items: Iterable[TensorInfo]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in items:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def header_only_file(items: Iterable[TensorInfo]) -> bytes:
    """A safetensors file cut after its header: enough for a metadata reader."""
    return header_bytes(items)


def full_file(items: Iterable[TensorInfo]) -> bytes:
    """A complete safetensors file with zeroed data (for small tensors only)."""
    items = list(items)
    return header_bytes(items) + b"\x00" * sum(t.nbytes for t in items)


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_json(shards: Sequence[Sequence[TensorInfo]]) -> dict[str, Any]:
    names = shard_names(len(shards))
    return {
        "metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
        "weight_map": {t.name: n for n, s in zip(names, shards, strict=True) for t in s},
    }


def upload(client: Any, bucket: str, prefix: str, name: str) -> None:
    """Put a metadata-only checkpoint of ``name`` under ``prefix`` (config, index, headers,
    tokenizer stub)."""
    shards = model_shards(name)
    client.put_object(
        Bucket=bucket, Key=prefix + "config.json", Body=json.dumps(config(name)).encode()
    )
    client.put_object(Bucket=bucket, Key=prefix + "tokenizer.json", Body=b'{"model": {}}')
    names = shard_names(len(shards))
    if len(shards) > 1:
        client.put_object(
            Bucket=bucket,
            Key=prefix + "model.safetensors.index.json",
            Body=json.dumps(index_json(shards)).encode(),
        )
    for n, s in zip(names, shards, strict=True):
        client.put_object(Bucket=bucket, Key=prefix + n, Body=header_only_file(s))
