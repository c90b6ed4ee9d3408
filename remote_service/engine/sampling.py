"""Batched next-token sampling: temperature, top-k, top-p and repetition penalty per row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from remote_service.engine.base import SamplingParams

#: Below this a temperature is greedy: dividing logits by it overflows float32 to inf, and the
#: distribution it asks for is already the argmax.
MIN_TEMPERATURE = 1e-5


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """Pick one token per row of ``logits`` ([batch, vocab]).

    ``seen`` ([batch, vocab] bool) marks the ids already in each row's prompt or output, for the
    repetition penalty; ``generators`` holds a seeded generator per row or None. Ids at or above
    ``vocab_size`` (padding rows of the embedding that the tokenizer cannot decode) are never
    picked.
    """
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[:, vocab_size:] = float("-inf")
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        pen = torch.tensor(
            [p.repetition_penalty for p in params], device=logits.device, dtype=logits.dtype
        )[:, None]
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, penalized, logits)
    logits = torch.nan_to_num(logits, nan=float("-inf"))  # a NaN must never be chosen

    greedy = torch.tensor([p.temperature < MIN_TEMPERATURE for p in params], device=logits.device)
    argmax = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return [int(t) for t in argmax.tolist()]

    temps = torch.tensor(
        [p.temperature if p.temperature >= MIN_TEMPERATURE else 1.0 for p in params],
        device=logits.device,
        dtype=logits.dtype,
    )
    scaled = logits / temps[:, None]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    vocab = sorted_logits.shape[-1]
    top_k = torch.tensor(
        [p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device
    )
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=probs.dtype)
    # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
    drop = (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    # Extreme but valid settings (a repetition penalty near 0 sends logits to inf) can leave a
    # row with no distribution: that row falls back to greedy instead of failing the batch.
    bad = ~torch.isfinite(probs).all(dim=-1)
    if bool(bad.any()):
        greedy = greedy | bad
        fallback = torch.zeros_like(probs)
        fallback[:, 0] = 1.0
        probs = torch.where(bad[:, None], fallback, probs)

    unseeded = [i for i, g in enumerate(generators) if g is None]
    chosen = torch.empty(len(params), dtype=torch.long, device=logits.device)
    if unseeded:
        rows = torch.tensor(unseeded, device=logits.device)
        chosen[rows] = torch.multinomial(probs[rows], 1).squeeze(-1)
    for i, gen in enumerate(generators):
        if gen is not None:
            chosen[i] = torch.multinomial(probs[i : i + 1], 1, generator=gen).squeeze()
    sampled = sorted_idx.gather(1, chosen[:, None]).squeeze(-1)
    result = torch.where(greedy, argmax, sampled)
    return [int(t) for t in result.tolist()]
