"""A KV cache allocated once, one fixed row ("slot") per running sequence, written in place.

Each layer holds K and V buffers of shape [slots, kv_heads, max_len, head_dim], allocated when
the engine loads (``ASOBA_MAX_NUM_SEQS`` x ``ASOBA_MAX_MODEL_LEN``), so memory is what the plan
says and never grows. A forward pass writes its new keys and values at each row's own
positions (an indexed store: O(new tokens), not O(cache)) and attends to the first ``length``
columns of its rows. Sequences joining or leaving touch only their own row.

The cache is handed to the model as its ``cache`` argument; transformers' attention layers call
:meth:`SlotKVCache.update` with the new keys and values of each layer. Which slots and positions
a call writes is set beforehand with :meth:`SlotKVCache.bind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CacheShape:
    layers: int
    slots: int
    kv_heads: int
    max_len: int
    head_dim: int

    @classmethod
    def of(cls, config: Any, *, slots: int, max_len: int) -> CacheShape:
        """The shape a (text) model config asks for."""
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            layers=int(config.num_hidden_layers),
            slots=slots,
            kv_heads=int(kv_heads),
            max_len=max_len,
            head_dim=int(head_dim),
        )


class SlotKVCache:
    """Preallocated per-slot K/V buffers; see the module docstring."""

    def __init__(self, shape: CacheShape, *, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        dims = (shape.slots, shape.kv_heads, shape.max_len, shape.head_dim)
        self.keys = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.layers)]
        self._rows: torch.Tensor | None = None  # [batch, 1] slot of each input row
        self._positions: torch.Tensor | None = None  # [batch, time] column each new token goes to
        self._read: slice | torch.Tensor = slice(0, 0)
        self._length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def bind(
        self,
        rows: torch.Tensor,
        positions: torch.Tensor,
        *,
        read: slice | torch.Tensor,
        length: int,
    ) -> None:
        """Route the next forward pass: input row i writes slot ``rows[i]`` at ``positions[i]``
        and attends to columns ``[0, length)`` of the slots ``read`` selects (a slice of
        contiguous slots is a view; an index tensor gathers)."""
        self._rows = rows[:, None]
        self._positions = positions
        self._read = read
        self._length = length

    # --- what transformers' attention layers call ----------------------------------------------

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None or self._positions is None:
            raise RuntimeError("SlotKVCache.update before bind()")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # [batch, heads, time, dim] -> [batch, time, heads, dim]: the indexed layout.
        keys[self._rows, :, self._positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._rows, :, self._positions] = value_states.transpose(1, 2).to(values.dtype)
        n = self._length
        if isinstance(self._read, slice):
            return keys[self._read, :, :n], values[self._read, :, :n]
        return keys[:, :, :n].index_select(0, self._read), values[:, :, :n].index_select(
            0, self._read
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length

    # --- slot bookkeeping ------------------------------------------------------------------------

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of slot ``src`` into slot ``dst``."""
        for t in (*self.keys, *self.values):
            t[dst, :, :length].copy_(t[src, :, :length])

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        for t in (*self.keys, *self.values):
            held = t[a, :, :length_a].clone()
            t[a, :, :length_b].copy_(t[b, :, :length_b])
            t[b, :, :length_a].copy_(held)


def cache_bytes(shape: CacheShape, dtype: torch.dtype) -> int:
    """Bytes :class:`SlotKVCache` allocates for ``shape``: 2 (K, V) x layers x slots x kv_heads
    x max_len x head_dim x element size -- the estimator's KV term."""
    element = torch.empty((), dtype=dtype).element_size()
    return (
        2 * shape.layers * shape.slots * shape.kv_heads * shape.max_len * shape.head_dim * element
    )
