"""The model side of continuous batching: one left-padded batch with one KV cache.

All running sequences share a ``DynamicCache`` of shape [batch, kv_heads, time, head_dim] and a
[batch, time] attention mask (0 marks left padding). Joining sequences are prefilled as their own
left-padded batch, then both caches are left-padded to the same length and concatenated on the
batch axis; leaving sequences are removed with an index select, and columns that became padding
in every row are trimmed. Copies happen only when the batch changes, never per decode step.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from remote_service.engine.sampling import sample_next
from remote_service.engine.scheduler import Sequence


class TorchBatchRunner:
    def __init__(self, model: Any, *, pad_id: int, vocab_size: int | None = None) -> None:
        self._model = model
        self._device = model.get_input_embeddings().weight.device
        self._pad_id = pad_id
        self._vocab_size = vocab_size
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, time], long
        self._seen: torch.Tensor | None = None  # [batch, vocab], bool: for repetition penalty

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        width = max(s.prompt_len for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = seq.prompt_len
            ids[i, width - n :] = torch.tensor(list(seq.request.prompt_ids), dtype=torch.long)
            mask[i, width - n :] = 1
            if seq.request.params.seed is not None:
                gen = torch.Generator(device=self._device)
                seq.runner_state = gen.manual_seed(seq.request.params.seed)
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :]
        # Which ids each prompt holds (padding replaced by the row's last, always real, id).
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=self._device)
        seen.scatter_(1, torch.where(mask.bool(), ids, ids[:, -1:]), True)
        tokens = self._sample(logits, seqs, seen)
        self._merge(out.cache, mask, seen, seqs)
        return tokens

    @torch.inference_mode()
    def decode(self) -> list[tuple[Sequence, int]]:
        if not self._rows or self._mask is None:
            return []
        last = torch.tensor([[s.last_token] for s in self._rows], dtype=torch.long)
        ones = torch.ones((len(self._rows), 1), dtype=torch.long, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = self._mask.sum(dim=-1, keepdim=True) - 1
        out = self._model(
            input_ids=last.to(self._device),
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = out.cache
        tokens = self._sample(out.logits[:, -1, :], self._rows, self._seen)
        return list(zip(self._rows, tokens, strict=True))

    def release(self, seqs: Collection[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self._rows) if id(s) not in gone]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self.reset()
            return
        assert self._cache is not None and self._mask is not None and self._seen is not None
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        self._rows = [self._rows[i] for i in keep]
        self._seen = self._seen.index_select(0, index)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row carry no information: trim them.
        used = mask.sum(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        self._mask = mask[:, start:]
        for layer in _layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]

    def reset(self) -> None:
        self._rows, self._cache, self._mask, self._seen = [], None, None, None

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], seen: torch.Tensor | None
    ) -> list[int]:
        tokens = sample_next(
            logits,
            [s.request.params for s in seqs],
            [s.runner_state for s in seqs],
            seen=seen,
            vocab_size=self._vocab_size,
        )
        if seen is not None:
            rows = torch.arange(len(tokens), device=self._device)
            seen[rows, torch.tensor(tokens, device=self._device)] = True
        return tokens

    def _merge(
        self, cache: DynamicCache, mask: torch.Tensor, seen: torch.Tensor, seqs: list[Sequence]
    ) -> None:
        if self._cache is None or self._mask is None or self._seen is None or not self._rows:
            self._rows, self._cache, self._mask, self._seen = list(seqs), cache, mask, seen
            return
        self._seen = torch.cat([self._seen, seen], dim=0)
        old_t, new_t = self._mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)
        self._mask = torch.cat(
            [F.pad(self._mask, (width - old_t, 0)), F.pad(mask, (width - new_t, 0))], dim=0
        )
        for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_time(old.keys, width), _pad_time(new.keys, width)], dim=0)
            old.values = torch.cat(
                [_pad_time(old.values, width), _pad_time(new.values, width)], dim=0
            )
        self._rows.extend(seqs)


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def _pad_time(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a [batch, heads, time, dim] tensor with zeros to ``width`` time steps."""
    missing = width - t.shape[2]
    return F.pad(t, (0, 0, missing, 0)) if missing > 0 else t
