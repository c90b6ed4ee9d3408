"""vLLM's GPU memory: what it needs, what it reserves, and the KV cache it is left with.

vLLM preallocates. At start each of its GPUs must have ``gpu_memory_utilization`` (util) x
that GPU's TOTAL memory free, or it refuses to start; it then keeps all of that claim, and
whatever the weights, the profile run, the CUDA graphs and the runtime leave becomes the KV
cache. Sizes in bytes, per GPU (``tp`` = tensor_parallel_size, 1 on one GPU)::

    util        = floor(usable / total, 2 decimals), at most MAX_UTILIZATION (0.95)
                  usable: the placement's headroom on that GPU (measured free + what the
                  placement frees: Flux when it is stopped, our own old service) - gpu_margin_gb;
                  beside Flux also at most coexist_max_gb, so vLLM never claims more than a
                  small model is allowed there (and never more than Flux leaves - the margin)
    claim       = util * total
    weights     = the estimator's weights (none: 2*P; awq: the checkpoint's bytes) / tp
    activations = vLLM's profile run: a prefill of max_num_batched_tokens tokens
                  (default max(max_model_len, 2048): the chunk it profiles), with the
                  estimator's activation term for that many tokens:
                  tokens * (4*hidden + 3*ffn_active) * 2 + max_num_seqs * vocab * 4
                  (no config.json: the estimator's activations scaled to those tokens)
    cuda graphs = CUDA_GRAPH_BYTES_PER_LAYER (16 MiB) * layers, at least 128 MiB: an estimate
                  from vLLM's start-up log ("Graph capturing finished in ... took 0.5-1 GiB"
                  for 7-14B models at the default capture sizes up to max_num_seqs): 0.5 GiB
                  for a 32-layer 8B model, 0.6 GiB for a 40-layer 14B; 1 GiB without
                  config.json
    runtime     = CUDA context and non-torch memory (estimate.CUDA_CONTEXT_BYTES, ~0.8 GB)
    kv (least)  = max_num_seqs * ceil(max_model_len / 16) * 16 * kv_bytes_per_token / tp
                  (whole KV blocks of KV_BLOCK_TOKENS = 16 tokens per sequence)
    need        = weights + activations + cuda graphs + runtime + kv (least)

It fits when need <= claim. The KV cache vLLM gets is the rest of the claim::

    kv_cache_bytes = claim - weights - activations - cuda graphs - runtime     (>= kv least)
    kv tokens      = whole blocks of kv_cache_bytes * tp / kv_bytes_per_token

``max_model_len`` = min(policy.context_tokens, the model's context) (the estimate's
``context_tokens``), ``max_num_seqs`` = policy.concurrent_seqs (its ``concurrent_seqs``).
Host RAM: the estimator's (process + the largest shard twice), plus one more process's
PROCESS_RAM_BYTES for each extra tensor-parallel worker.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from .estimate import CUDA_CONTEXT_BYTES, GIB, MIB, PROCESS_RAM_BYTES, Estimate, size_text

KV_BLOCK_TOKENS = 16  # vLLM's KV block size
DEFAULT_BATCHED_TOKENS = 2048  # vLLM's floor for max_num_batched_tokens
MAX_UTILIZATION_PCT = 95  # gpu_memory_utilization at most 0.95 (vLLM's default is 0.90)
CUDA_GRAPH_BYTES_PER_LAYER = 16 * MIB
MIN_CUDA_GRAPH_BYTES = 128 * MIB
FALLBACK_CUDA_GRAPH_BYTES = 1 * GIB
TP_SIZES = (2, 4, 8)
VLLM_QUANTIZATIONS = ("none", "awq")  # what vLLM is used for here (never bitsandbytes)


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VllmNeed(_Data):
    """What vLLM needs on each of its ``tensor_parallel_size`` GPUs (formula in the module
    doc); ``need_bytes`` is the sum of the five parts."""

    quantization: str
    tensor_parallel_size: int
    max_model_len: int
    max_num_seqs: int
    batched_tokens: int
    weights_bytes: int
    activation_bytes: int
    cuda_graph_bytes: int
    runtime_bytes: int
    kv_least_bytes: int
    kv_bytes_per_token: int  # per GPU
    need_bytes: int
    ram_bytes: int
    disk_bytes: int

    def breakdown(self) -> str:
        return (
            f"weights {size_text(self.weights_bytes)}, KV {size_text(self.kv_least_bytes)} "
            f"for {self.max_num_seqs} x {self.max_model_len} tokens, activations "
            f"{size_text(self.activation_bytes)}, CUDA graphs {size_text(self.cuda_graph_bytes)}, "
            f"runtime {size_text(self.runtime_bytes)}"
        )

    @property
    def fixed_bytes(self) -> int:
        """Everything but the KV cache."""
        return (
            self.weights_bytes
            + self.activation_bytes
            + self.cuda_graph_bytes
            + (self.runtime_bytes)
        )


class VllmFit(_Data):
    """``need`` against one GPU's usable memory."""

    gpu_memory_utilization: float
    total_bytes: int
    usable_bytes: int
    claim_bytes: int  # util x total: what vLLM takes
    kv_cache_bytes: int  # the rest of the claim (0 when it does not fit)
    kv_cache_tokens: int
    fits: bool


def utilization_pct(usable_bytes: int, total_bytes: int) -> int:
    """gpu_memory_utilization in hundredths: usable / total rounded down, at most 95."""
    if total_bytes <= 0 or usable_bytes <= 0:
        return 0
    return min(MAX_UTILIZATION_PCT, usable_bytes * 100 // total_bytes)


def vllm_need(est: Estimate, quantization: str, tp: int = 1) -> VllmNeed:
    """vLLM's need per GPU for ``est``'s weights at ``quantization`` (none or awq)."""
    if quantization not in VLLM_QUANTIZATIONS:
        raise ValueError(f"vLLM is not used with {quantization}")
    base = est.needs[quantization]
    max_model_len = est.context_tokens
    seqs = est.concurrent_seqs
    tokens = max(max_model_len, DEFAULT_BATCHED_TOKENS)
    if est.activation_bytes_per_token is not None:
        activations = tokens * est.activation_bytes_per_token + seqs * est.logits_bytes_per_seq
    else:
        activations = math.ceil(base.activation_bytes * max(1.0, tokens / max_model_len))
    if est.num_layers:
        graphs = max(est.num_layers * CUDA_GRAPH_BYTES_PER_LAYER, MIN_CUDA_GRAPH_BYTES)
    else:
        graphs = FALLBACK_CUDA_GRAPH_BYTES
    kv_per_token = math.ceil(est.kv_bytes_per_token / tp)
    blocks = math.ceil(max_model_len / KV_BLOCK_TOKENS)
    kv_least = seqs * blocks * KV_BLOCK_TOKENS * kv_per_token
    weights = math.ceil(base.weights_bytes / tp)
    runtime = CUDA_CONTEXT_BYTES
    return VllmNeed(
        quantization=quantization,
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        max_num_seqs=seqs,
        batched_tokens=tokens,
        weights_bytes=weights,
        activation_bytes=activations,
        cuda_graph_bytes=graphs,
        runtime_bytes=runtime,
        kv_least_bytes=kv_least,
        kv_bytes_per_token=kv_per_token,
        need_bytes=weights + activations + graphs + runtime + kv_least,
        ram_bytes=base.ram_bytes + (tp - 1) * PROCESS_RAM_BYTES,
        disk_bytes=base.disk_bytes,
    )


def fit(need: VllmNeed, usable_bytes: int, total_bytes: int, *, pct: int | None = None) -> VllmFit:
    """``need`` on a GPU of ``total_bytes`` with ``usable_bytes`` usable; ``pct`` forces the
    utilization (tensor parallelism: the least over its GPUs)."""
    if pct is None:
        pct = utilization_pct(usable_bytes, total_bytes)
    claim = total_bytes * pct // 100
    kv = claim - need.fixed_bytes
    fits = pct > 0 and need.need_bytes <= claim
    tokens = 0
    if fits and need.kv_bytes_per_token > 0:
        per_block = KV_BLOCK_TOKENS * need.kv_bytes_per_token
        tokens = kv // per_block * KV_BLOCK_TOKENS
    return VllmFit(
        gpu_memory_utilization=pct / 100,
        total_bytes=total_bytes,
        usable_bytes=usable_bytes,
        claim_bytes=claim,
        kv_cache_bytes=max(kv, 0) if fits else 0,
        kv_cache_tokens=tokens,
        fits=fits,
    )


def tp_sizes(est: Estimate, gpu_count: int) -> list[int]:
    """The tensor_parallel_size values to try, smallest first: 2, 4, 8 up to the GPU count,
    dividing the attention heads and the KV heads (none when the shapes are unknown)."""
    heads, kv_heads = est.num_attention_heads, est.num_kv_heads
    if not heads or not kv_heads:
        return []
    return [tp for tp in TP_SIZES if tp <= gpu_count and heads % tp == 0 and kv_heads % tp == 0]


def fit_text(need: VllmNeed, got: VllmFit, where: str) -> str:
    """``vllm needs X on GPU 0 (weights ...), the placement offers E (util F of G)``."""
    return (
        f"vllm needs {size_text(need.need_bytes)} on {where} ({need.breakdown()}), the "
        f"placement offers {size_text(got.claim_bytes)} (gpu_memory_utilization "
        f"{got.gpu_memory_utilization:.2f} of {size_text(got.total_bytes)})"
    )
