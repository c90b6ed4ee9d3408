"""How much GPU memory, host RAM and disk a model needs, at each precision it could run in.

Inputs: ``ModelMeta`` (parameters split by kind, from the safetensors headers; layer and head
shapes from config.json) and the serving policy (``context_tokens``, ``concurrent_seqs``).
Sizes in bytes; GB below means 10^9 bytes.

GPU need = weights + KV cache + activations + runtime::

    weights, by precision (P = all parameters; L = quantizable matrix parameters;
    R = their rows; S = P - L: embeddings, output head, norms, biases -- kept 16-bit):
      none (bf16/fp16)   2·P
      bnb-8bit           1·L + 4·R (fp32 scale per row, LLM.int8)       + 2·S
      bnb-4bit (NF4)     L/2 + L/64 (8-bit absmax per 64-block, double-quantized)
                         + 4·L/(64·256) (fp32 scale per 256 absmax)    + 2·S
                         ≈ 4.13 bits per matrix parameter
      awq (pre-quantized) the checkpoint's own tensor bytes (qweight 4-bit + fp16 scales and
                         4-bit zeros per group of 128 ≈ 4.16 bits, embeddings/head fp16)
    KV cache     = 2 (K and V) · layers · kv_heads · head_dim · 2 bytes (fp16 cache)
                   · min(context_tokens, model context) · concurrent_seqs
    activations  = prefill of one full-context sequence, SDPA attention (no n² score matrix):
                   tokens · (4·hidden + 3·ffn_active) · 2 bytes,
                   + fp32 logits of the last position of each sequence (seqs · vocab · 4)
                   (ffn_active: intermediate_size, or for MoE moe_intermediate · experts/token)
    runtime      = CUDA context and cuBLAS workspaces (CUDA_CONTEXT_BYTES, ~0.8 GB: the
                   0.5-1 GB torch takes on an A10G), + for bitsandbytes one dequantized
                   16-bit copy of the largest matrix (the layer being computed)

Host RAM need = PROCESS_RAM_BYTES (Python, torch, CUDA libraries, tokenizer) + LOAD_RAM_FACTOR
· the largest weights file (a shard is materialised on the CPU, and converted or quantized,
before it moves to the GPU; safetensors maps the rest lazily).

Disk need = every file the pull downloads (weights at their stored size, config, tokenizer).

vLLM's need is computed from these same terms by ``deployer.vllm_memory`` (it preallocates a
fraction of the GPU, profiles a longer prefill and captures CUDA graphs); the parts it needs
per token, per sequence and per layer are kept on the ``Estimate``.

Without config.json (catalog fallback) the KV cache is taken as
FALLBACK_KV_BYTES_PER_TOKEN_PER_B per billion parameters per token, activations as
FALLBACK_ACTIVATION_SHARE of the 16-bit weights; the plan says the estimate is approximate.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .catalog import ModelSpec
from .config import PolicyConfig
from .model_meta import ModelMeta

Quantization = Literal["none", "awq", "bnb-4bit", "bnb-8bit"]

GB = 1_000_000_000
MIB = 1024 * 1024
GIB = 1024 * MIB
CUDA_CONTEXT_BYTES = 800 * MIB
PROCESS_RAM_BYTES = 2 * GIB
LOAD_RAM_FACTOR = 2
KV_BYTES = 2  # fp16/bf16 cache entries
LOGIT_BYTES = 4  # logits are upcast to fp32
NF4_BLOCK = 64
NF4_SCALE_BLOCK = 256
FALLBACK_KV_BYTES_PER_TOKEN_PER_B = 16 * 1024
FALLBACK_ACTIVATION_SHARE = 0.02
MIN_ACTIVATION_BYTES = 64 * MIB


def gb(n: int | float) -> float:
    return n / GB


def size_text(n: int | float) -> str:
    """A size for people: GB (10^9) with one decimal, MB or kB below 0.1 GB."""
    if abs(n) >= GB / 10 or n == 0:
        return f"{n / GB:.1f} GB"
    if abs(n) >= 1_000_000:
        return f"{n / 1_000_000:.0f} MB"
    return f"{n / 1000:.0f} kB"


def count_text(n: int) -> str:
    """A parameter count for people: 14.77B, 149M, 1.2M."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e7:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e6:.1f}M"


class Need(BaseModel):
    """What one way of serving a model takes. ``gpu_bytes`` is the sum of its four parts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantization: Quantization
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    runtime_bytes: int
    gpu_bytes: int
    ram_bytes: int
    disk_bytes: int

    def breakdown(self) -> str:
        return (
            f"weights {size_text(self.weights_bytes)} + KV cache {size_text(self.kv_cache_bytes)}"
            f" + activations {size_text(self.activation_bytes)}"
            f" + runtime {size_text(self.runtime_bytes)}"
        )


class Estimate(BaseModel):
    """Needs of one catalog entry's weights at every precision that applies to them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    source: Literal["s3", "catalog"]
    exists: bool | None
    exact: bool  # False: parts approximated (no config.json, or catalog figures)
    notes: list[str]
    parameters: int
    stored_dtype: str
    stored_bytes: int
    download_bytes: int
    largest_shard_bytes: int
    context_tokens: int  # per sequence, after the model's own cap
    concurrent_seqs: int
    kv_bytes_per_token: int
    needs: dict[str, Need]
    # The activation term per prompt token and the logits per sequence (None / 0: no
    # config.json), and the shapes vLLM's tensor parallelism divides (None: unknown).
    activation_bytes_per_token: int | None = None
    logits_bytes_per_seq: int = 0
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None

    def need(self, quantization: Quantization) -> Need | None:
        return self.needs.get(quantization)

    def describe(self) -> str:
        return (
            f"{self.model}: {count_text(self.parameters)} parameters, {self.stored_dtype}, "
            f"{size_text(self.stored_bytes)} stored, from "
            + ("S3 metadata" if self.source == "s3" else "the catalog (approximate)")
        )


def weight_bytes(meta: ModelMeta, quantization: Quantization) -> int:
    """Bytes of the weights on the GPU at ``quantization`` (formula in the module doc)."""
    w = meta.weights
    if quantization == "awq":
        if not w.packed:
            raise ValueError(f"{meta.name} is not a pre-quantized checkpoint")
        return w.stored_bytes
    if w.packed:
        raise ValueError(f"{meta.name} is pre-quantized; it runs only as itself")
    sixteen = 2 * (w.parameters - w.linear_params)
    if quantization == "none":
        return 2 * w.parameters
    if quantization == "bnb-8bit":
        return w.linear_params + 4 * w.linear_rows + sixteen
    if quantization == "bnb-4bit":
        blocks = math.ceil(w.linear_params / NF4_BLOCK)
        return (
            math.ceil(w.linear_params / 2)
            + blocks
            + 4 * math.ceil(blocks / NF4_SCALE_BLOCK)
            + sixteen
        )
    raise ValueError(f"unknown quantization {quantization!r}")


def estimate(meta: ModelMeta, spec: ModelSpec, policy: PolicyConfig) -> Estimate:
    """Every applicable ``Need`` of ``meta`` under ``policy``."""
    cfg = meta.config
    model_context = (cfg.max_context if cfg and cfg.max_context else None) or spec.context_length
    context = max(1, min(policy.context_tokens, model_context))
    seqs = policy.concurrent_seqs
    notes = list(meta.notes)
    per_token: int | None = None
    logits_per_seq = 0
    if cfg is not None:
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * KV_BYTES
        per_token = (4 * cfg.hidden_size + 3 * cfg.ffn_active_size) * 2
        logits_per_seq = (cfg.vocab_size or 0) * LOGIT_BYTES
        activations = context * per_token + seqs * logits_per_seq
    else:
        params_b = meta.weights.parameters / 1e9
        kv_per_token = max(int(FALLBACK_KV_BYTES_PER_TOKEN_PER_B * params_b), 1024)
        activations = max(
            int(FALLBACK_ACTIVATION_SHARE * 2 * meta.weights.parameters), MIN_ACTIVATION_BYTES
        )
        if meta.source == "s3":
            notes.append("KV cache and activations approximated (no config.json)")
    kv = kv_per_token * context * seqs
    ram = PROCESS_RAM_BYTES + LOAD_RAM_FACTOR * meta.largest_shard_bytes
    options: tuple[Quantization, ...] = (
        ("awq",) if meta.weights.packed else ("none", "bnb-8bit", "bnb-4bit")
    )
    needs: dict[str, Need] = {}
    for q in options:
        weights = weight_bytes(meta, q)
        runtime = CUDA_CONTEXT_BYTES
        if q.startswith("bnb-"):
            runtime += 2 * meta.weights.largest_matrix_params
        needs[q] = Need(
            quantization=q,
            weights_bytes=weights,
            kv_cache_bytes=kv,
            activation_bytes=activations,
            runtime_bytes=runtime,
            gpu_bytes=weights + kv + activations + runtime,
            ram_bytes=ram,
            disk_bytes=meta.download_bytes,
        )
    return Estimate(
        model=meta.name,
        source=meta.source,
        exists=meta.exists,
        exact=meta.weights.exact and cfg is not None,
        notes=notes,
        parameters=meta.weights.parameters,
        stored_dtype=meta.weights.dtype,
        stored_bytes=meta.weights.stored_bytes,
        download_bytes=meta.download_bytes,
        largest_shard_bytes=meta.largest_shard_bytes,
        context_tokens=context,
        concurrent_seqs=seqs,
        kv_bytes_per_token=kv_per_token,
        needs=needs,
        activation_bytes_per_token=per_token,
        logits_bytes_per_seq=logits_per_seq,
        num_layers=cfg.num_layers if cfg else None,
        num_attention_heads=cfg.num_attention_heads if cfg else None,
        num_kv_heads=cfg.num_kv_heads if cfg else None,
    )
