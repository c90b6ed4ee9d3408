"""Batched next-token sampling: temperature, top-k, top-p and repetition penalty per row.

Everything here stays on the logits' device and never waits for it: which rows are greedy,
which need the top-k/top-p sort and which have a seed is known on the host from the requests'
parameters, so no device value is read back. The caller reads the chosen ids once.

Greedy rows take the argmax; rows with top-k and top-p off sample straight from the softmax;
only rows that filter pay for a full-vocabulary sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from remote_service.engine.base import SamplingParams

#: Below this a temperature is greedy: dividing logits by it overflows float32 to inf, and the
#: distribution it asks for is already the argmax.
MIN_TEMPERATURE = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_TEMPERATURE


def filters(params: SamplingParams, vocab: int) -> bool:
    """Whether a sampled row needs the sorted distribution (top-k or top-p is on)."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


@dataclass(frozen=True)
class RowParams:
    """Per-row parameters as device tensors ([rows] each), ready for :func:`sample_tokens`."""

    temperature: torch.Tensor  # float32; 1.0 for greedy rows (unused there)
    penalty: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; 0 when off
    top_p: torch.Tensor  # float32
    greedy: torch.Tensor  # bool


def row_params(params: Sequence[SamplingParams], device: torch.device | str) -> RowParams:
    """Build :class:`RowParams` from host values (one copy to the device)."""
    return RowParams(
        temperature=torch.tensor(
            [1.0 if is_greedy(p) else p.temperature for p in params], device=device
        ),
        penalty=torch.tensor([p.repetition_penalty for p in params], device=device),
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
        top_p=torch.tensor([p.top_p for p in params], device=device),
        greedy=torch.tensor([is_greedy(p) for p in params], dtype=torch.bool, device=device),
    )


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    rows: RowParams,
    *,
    seen: torch.Tensor | None = None,
    vocab_size: int | None = None,
    index_of: IndexCache | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` ([batch, vocab]), as a device tensor.

    ``seen`` ([batch, vocab] bool) marks the ids already in each row's prompt or output, for the
    repetition penalty; ``generators`` holds a seeded generator per row or None. Ids at or above
    ``vocab_size`` (padding rows of the embedding that the tokenizer cannot decode) are never
    picked.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    if vocab_size is not None and vocab_size < vocab:
        logits[:, vocab_size:] = float("-inf")
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        pen = rows.penalty[:, None]
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, penalized, logits)
    logits = torch.nan_to_num(logits, nan=float("-inf"))  # a NaN must never be chosen
    argmax = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not is_greedy(p)]
    if not sampled:
        return argmax

    scaled = logits / rows.temperature[:, None]
    probs = scaled.softmax(dim=-1)
    filtered = [i for i in sampled if filters(params[i], vocab)]
    if filtered:
        pick = (index_of or IndexCache(logits.device)).get(filtered, len(params))
        probs = _filter_rows(probs, scaled, pick, rows, vocab)
    # Extreme but valid settings (a repetition penalty near 0 sends logits to inf) can leave a
    # row with no distribution: that row falls back to greedy instead of failing the batch.
    bad = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)
    safe = torch.where(bad[:, None], torch.ones_like(probs), probs)

    unseeded = any(generators[i] is None for i in sampled)
    chosen = torch.multinomial(safe, 1).squeeze(-1) if unseeded else argmax.clone()
    for i in sampled:
        gen = generators[i]
        if gen is not None:
            chosen[i : i + 1] = torch.multinomial(safe[i : i + 1], 1, generator=gen)[0]
    return torch.where(rows.greedy | bad, argmax, chosen)


def _filter_rows(
    probs: torch.Tensor,
    scaled: torch.Tensor,
    pick: torch.Tensor | slice,
    rows: RowParams,
    vocab: int,
) -> torch.Tensor:
    """``probs`` with top-k and top-p applied to the rows ``pick`` selects."""
    sub = scaled[pick]
    sorted_logits, sorted_idx = sub.sort(dim=-1, descending=True)
    top_k = rows.top_k[pick]
    top_k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > rows.top_p[pick][:, None]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    kept = torch.zeros_like(sub).scatter_(1, sorted_idx, sorted_probs)
    if isinstance(pick, slice):
        probs[pick] = kept
        return probs
    return probs.index_copy(0, pick, kept)


class IndexCache:
    """Device index tensors for row subsets, built once per subset without a host copy.

    The set of filtering rows changes only when the batch does, so each subset is built once
    (from a device ``arange``, so building it never waits on the device) and reused.
    """

    def __init__(self, device: torch.device | str, size: int = 0) -> None:
        self._device = device
        self._ids = torch.arange(max(size, 1), device=device)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def get(self, rows: Sequence[int], total: int) -> torch.Tensor | slice:
        key = tuple(rows)
        if key == tuple(range(total)):
            return slice(0, total)
        if len(key) and key == tuple(range(key[0], key[-1] + 1)):
            return slice(key[0], key[-1] + 1)
        found = self._cache.get(key)
        if found is None:
            if max(key) >= self._ids.numel():
                self._ids = torch.arange(max(key) + 1, device=self._device)
            found = torch.stack([self._ids[i] for i in key])
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = found
        return found


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """:func:`sample_tokens` with parameters taken from ``params``, read back as ids."""
    rows = row_params(params, logits.device)
    tokens = sample_tokens(logits, params, generators, rows, seen=seen, vocab_size=vocab_size)
    return [int(t) for t in tokens.tolist()]
