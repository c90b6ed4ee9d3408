"""The model side of continuous batching: fixed slots over a preallocated KV cache.

Every admitted sequence takes a slot: a row of the :class:`SlotKVCache` (allocated once, sized
``max_num_seqs`` x ``max_model_len``) and a row of each per-slot device tensor (length, last
token, seen-token mask, sampling parameters). Slots ``[0, decoding)`` hold sequences that are
generating; the slots after them hold sequences whose prompt is still being prefilled.

Each :meth:`TorchBatchRunner.step` runs

1. one prefill chunk: up to ``prefill_chunk`` prompt tokens of the waiting prompts, oldest
   first, so a long prompt is spread over several steps instead of stalling every stream; a
   prompt that completes samples its first token and its slot joins the decoding range;
2. one decode step for the decoding range, as a view of the cache (no gather): each row
   writes its new K/V at its own length and attends to its own tokens only (the mask covers
   ``[0, length]`` of each row).

The last tokens, lengths and the seen-token mask stay on the device: a step reads back only the
sampled ids, once. A sequence that leaves hands its slot to the last sequence of its range
(one row copied), so the ranges stay contiguous; nothing else moves.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from remote_service.engine.base import SamplingParams
from remote_service.engine.sampling import IndexCache, RowParams, is_greedy, sample_tokens
from remote_service.engine.scheduler import Sequence
from remote_service.engine.slot_cache import CacheShape, SlotKVCache

DEFAULT_PREFILL_CHUNK = 512


@dataclass(eq=False)
class _Row:
    seq: Sequence
    slot: int
    prompt: torch.Tensor  # host int64 ids
    length: int = 0  # tokens in the cache: prefilled so far, then prompt + fed-back tokens

    @property
    def params(self) -> SamplingParams:
        return self.seq.request.params

    @property
    def prefilled(self) -> bool:
        return self.length >= self.prompt.numel()


class TorchBatchRunner:
    def __init__(
        self,
        model: Any,
        *,
        pad_id: int,
        max_num_seqs: int,
        max_model_len: int,
        vocab_size: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        self._model = model
        embeddings = model.get_input_embeddings().weight
        self._device: torch.device = embeddings.device
        config = model.config.get_text_config()
        if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            model.set_attn_implementation("sdpa")  # the slot mask is a dense 4-D mask
        self._eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._dtype = embeddings.dtype
        self.embedding_rows = int(embeddings.shape[0])
        self._pad_id = pad_id
        self._vocab_size = vocab_size
        self._chunk = max(1, prefill_chunk)
        self._max_len = max_model_len
        self.shape = CacheShape.of(config, slots=max_num_seqs, max_len=max_model_len)
        self.cache = SlotKVCache(self.shape, dtype=embeddings.dtype, device=self._device)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ()
        self._window: int | None = (
            int(window) if window and "sliding_attention" in layer_types else None
        )
        out = model.get_output_embeddings()
        width = int(out.weight.shape[0]) if out is not None else int(config.vocab_size)

        dev, slots = self._device, max_num_seqs
        self._ids = torch.arange(max(slots, max_model_len), device=dev)  # slots and columns
        self._lengths = torch.zeros(slots, dtype=torch.long, device=dev)
        self._last = torch.zeros(slots, dtype=torch.long, device=dev)
        self._seen = torch.zeros((slots, width), dtype=torch.bool, device=dev)
        self._temperature = torch.ones(slots, device=dev)
        self._penalty = torch.ones(slots, device=dev)
        self._top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self._top_p = torch.ones(slots, device=dev)
        self._greedy = torch.zeros(slots, dtype=torch.bool, device=dev)
        self._true = torch.ones((), dtype=torch.bool, device=dev)
        self._index = IndexCache(dev, slots)

        self._rows: list[_Row] = []  # by slot
        self._decoding = 0  # slots [0, decoding) generate; the rest are being prefilled
        self._pending: list[_Row] = []  # prefill order (oldest first)

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @property
    def _per_slot(self) -> tuple[torch.Tensor, ...]:
        return (
            self._lengths,
            self._last,
            self._seen,
            self._temperature,
            self._penalty,
            self._top_k,
            self._top_p,
            self._greedy,
        )

    # --- BatchRunner --------------------------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            slot = len(self._rows)
            if slot >= self.shape.slots:
                raise RuntimeError(f"all {self.shape.slots} slots are taken")
            ids = list(seq.request.prompt_ids) or [self._pad_id]
            row = _Row(seq=seq, slot=slot, prompt=torch.tensor(ids, dtype=torch.long))
            p = seq.request.params
            # Python scalars go down as kernel arguments: no host-device copy to wait for.
            self._lengths[slot] = 0
            self._temperature[slot] = 1.0 if is_greedy(p) else p.temperature
            self._penalty[slot] = p.repetition_penalty
            self._top_k[slot] = p.top_k
            self._top_p[slot] = p.top_p
            self._greedy[slot] = is_greedy(p)
            self._seen[slot] = False
            self._seen[slot].index_fill_(0, row.prompt.to(self._device, non_blocking=True), True)
            if p.seed is not None:
                seq.runner_state = torch.Generator(device=self._device).manual_seed(p.seed)
            self._rows.append(row)
            self._pending.append(row)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int]]:
        decoding = self._rows[: self._decoding]
        seqs: list[Sequence] = []
        parts: list[torch.Tensor] = []
        if self._pending:
            done, tokens = self._prefill_chunk()
            if done:
                seqs.extend(r.seq for r in done)
                parts.append(tokens)
        if decoding:
            parts.append(self._decode(decoding))
            seqs.extend(r.seq for r in decoding)
        if not parts:
            return []
        ids = torch.cat(parts) if len(parts) > 1 else parts[0]
        return list(zip(seqs, ids.tolist(), strict=True))  # the step's one host sync

    def release(self, seqs: Collection[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        for row in [r for r in self._rows if id(r.seq) in gone]:
            self._remove(row)

    def reset(self) -> None:
        self._rows, self._pending, self._decoding = [], [], 0

    # --- model passes ------------------------------------------------------------------------

    def _prefill_chunk(self) -> tuple[list[_Row], torch.Tensor]:
        """Prefill the next ``prefill_chunk`` prompt tokens; sample for prompts that complete."""
        budget = self._chunk
        batch: list[tuple[_Row, int, int]] = []
        for row in self._pending:
            n = min(row.prompt.numel() - row.length, budget)
            batch.append((row, row.length, n))
            budget -= n
            if budget <= 0:
                break
        width = max(n for _, _, n in batch)
        # Shorter chunks are left-padded so every row's last real token is the last column
        # (logits_to_keep=1). Padding writes to column max_len - 1, which no real token uses
        # (a prompt is shorter than max_len, and the token that fills the context is never fed
        # back), and is never read.
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        pos = torch.full((len(batch), width), self._max_len - 1, dtype=torch.long)
        for i, (row, start, n) in enumerate(batch):
            ids[i, width - n :] = row.prompt[start : start + n]
            pos[i, width - n :] = torch.arange(start, start + n)
        slots = torch.tensor([row.slot for row, _, _ in batch], dtype=torch.long)
        packed = torch.cat([ids.flatten(), pos.flatten(), slots]).to(
            self._device, non_blocking=True
        )
        cells = ids.numel()
        ids_d = packed[:cells].view(ids.shape)
        pos_d = packed[cells : 2 * cells].view(pos.shape)
        slots_d = packed[2 * cells :]
        length = max(start + n for _, start, n in batch)
        first, last = batch[0][0].slot, batch[-1][0].slot
        contiguous = [r.slot for r, _, _ in batch] == list(range(first, last + 1))
        read = slice(first, last + 1) if contiguous else slots_d  # a view when it can be
        self.cache.bind(slots_d, pos_d, read=read, length=length)
        # Whole prompts from their start, unpadded: plain causal attention, which SDPA runs
        # without a mask (and skips the upper triangle).
        fresh = all(start == 0 and n == width for _, start, n in batch)
        logits = self._forward(ids_d, pos_d, length, causal=fresh)

        for row, _, n in batch:
            row.length += n
        finished = [i for i, (row, _, _) in enumerate(batch) if row.prefilled]
        if not finished:
            return [], logits[:0, 0]
        done = [batch[i][0] for i in finished]
        pick = self._index.get(finished, len(batch))
        done_slots = slots_d[pick]
        tokens = self._sample(logits[pick], done_slots, done_slots, done)
        self._last.index_copy_(0, done_slots, tokens)
        for row in done:
            self._lengths[row.slot] = row.length
            self._pending.remove(row)
            self._promote(row)
        return done, tokens

    def _decode(self, rows: list[_Row]) -> torch.Tensor:
        n = len(rows)
        length = max(r.length for r in rows) + 1
        positions = self._lengths[:n, None]  # each row writes its next token at its length
        self.cache.bind(self._ids[:n], positions, read=slice(0, n), length=length)
        logits = self._forward(self._last[:n, None], positions, length)
        tokens = self._sample(logits, slice(0, n), self._ids[:n], rows)
        self._last[:n] = tokens
        self._lengths[:n] += 1
        for r in rows:
            r.length += 1
        return tokens

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, length: int, *, causal: bool = False
    ) -> torch.Tensor:
        """Logits of each row's last input token; the cache must be bound already.

        ``causal``: every row holds positions ``0..length-1``, so the plain causal mask of the
        attention implementation is exact (eager attention has none: it always gets a mask).
        """
        masks: dict[str, torch.Tensor | None]
        if causal and not self._eager and (self._window is None or length <= self._window):
            masks = {"full_attention": None, "sliding_attention": None}
        else:
            cols = self._ids[:length]
            # [batch, 1, time, length]: a query at position p sees columns 0..p of its own row.
            allowed = cols[None, None, None, :] <= positions[:, None, :, None]
            masks = {"full_attention": self._attention_mask(allowed)}
            if self._window is not None:
                near = cols[None, None, None, :] > positions[:, None, :, None] - self._window
                masks["sliding_attention"] = self._attention_mask(allowed & near)
        out = self._model(
            input_ids=ids,
            attention_mask=masks,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]  # type: ignore[no-any-return]

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if not self._eager:
            return allowed  # SDPA takes a boolean mask
        blocked = torch.zeros(allowed.shape, dtype=self._dtype, device=allowed.device)
        return blocked.masked_fill(~allowed, torch.finfo(self._dtype).min)

    def _sample(
        self,
        logits: torch.Tensor,
        sel: slice | torch.Tensor,
        slot_ids: torch.Tensor,
        rows: list[_Row],
    ) -> torch.Tensor:
        params = [r.params for r in rows]
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        tokens = sample_tokens(
            logits,
            params,
            [r.seq.runner_state for r in rows],
            RowParams(
                temperature=self._temperature[sel],
                penalty=self._penalty[sel],
                top_k=self._top_k[sel],
                top_p=self._top_p[sel],
                greedy=self._greedy[sel],
            ),
            seen=self._seen[sel] if penalised else None,
            vocab_size=self._vocab_size,
            index_of=self._index,
        )
        self._seen.index_put_((slot_ids, tokens), self._true)
        return tokens

    # --- slot bookkeeping --------------------------------------------------------------------

    def _promote(self, row: _Row) -> None:
        """A prompt finished prefilling: move its slot to the end of the decoding range."""
        target = self._decoding
        if row.slot != target:
            other = self._rows[target]
            self.cache.swap(row.slot, target, row.length, other.length)
            for t in self._per_slot:
                held = t[target].clone()
                t[target] = t[row.slot]
                t[row.slot] = held
            self._rows[row.slot], self._rows[target] = other, row
            other.slot, row.slot = row.slot, target
        self._decoding += 1

    def _remove(self, row: _Row) -> None:
        if row in self._pending:
            self._pending.remove(row)
        hole = row.slot
        if hole < self._decoding:  # the last decoding row fills the hole
            tail = self._decoding - 1
            if hole != tail:
                self._move(self._rows[tail], hole)
            self._decoding -= 1
            hole = tail
        last = len(self._rows) - 1
        if hole != last:  # the last prefilling row fills what is left
            self._move(self._rows[last], hole)
        self._rows.pop()

    def _move(self, row: _Row, dst: int) -> None:
        self.cache.move(row.slot, dst, row.length)
        for t in self._per_slot:
            t[dst] = t[row.slot]
        self._rows[dst] = row
        row.slot = dst
