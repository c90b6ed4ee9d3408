"""Batched sampling (pure torch, tiny tensors)."""

from __future__ import annotations

import torch

from remote_service.engine.base import SamplingParams
from remote_service.engine.sampling import sample_next

LOGITS = torch.tensor([[0.0, 5.0, 4.9, -1.0, 9.0], [3.0, 1.0, 0.5, 2.9, 0.0]])


def p(**kw: float) -> SamplingParams:
    return SamplingParams(max_tokens=1, **kw)  # type: ignore[arg-type]


def test_greedy_and_padded_vocab() -> None:
    assert sample_next(LOGITS.clone(), [p(temperature=0)] * 2, [None, None]) == [4, 0]
    # id 4 lies beyond the tokenizer's vocabulary: never picked
    assert sample_next(LOGITS.clone(), [p(temperature=0)] * 2, [None, None], vocab_size=4) == [
        1,
        0,
    ]


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    for params in (p(temperature=1.5, top_k=1), p(temperature=1.5, top_p=1e-6)):
        for _ in range(20):
            assert sample_next(LOGITS.clone(), [params] * 2, [None, None]) == [4, 0]


def test_top_k_limits_the_candidates() -> None:
    picks = {
        tuple(sample_next(LOGITS.clone(), [p(temperature=5.0, top_k=2)] * 2, [None, None]))
        for _ in range(200)
    }
    assert {a for a, _ in picks} <= {4, 1} and {b for _, b in picks} <= {0, 3}
    assert len({a for a, _ in picks}) == 2  # both candidates do come up at this temperature


def test_repetition_penalty_demotes_seen_ids() -> None:
    seen = torch.zeros_like(LOGITS, dtype=torch.bool)
    seen[0, 4] = True  # 9.0 / 2 = 4.5 < 5.0
    seen[1, 0] = True  # 3.0 / 2 = 1.5 < 2.9
    params = [p(temperature=0, repetition_penalty=2.0)] * 2
    assert sample_next(LOGITS.clone(), params, [None, None], seen=seen) == [1, 3]


def test_seeded_rows_are_reproducible_next_to_unseeded_ones() -> None:
    params = [p(temperature=1.0), p(temperature=1.0)]

    def draw() -> int:
        gen = torch.Generator().manual_seed(42)
        return sample_next(torch.zeros(2, 1000), params, [None, gen])[1]

    assert len({draw() for _ in range(5)}) == 1


def test_extreme_but_valid_settings_never_fail_the_batch() -> None:
    """Settings the API accepts (temperature and penalty just above 0) overflow float32; each
    such row falls back to greedy and the ordinary row beside it still samples."""
    torch.manual_seed(0)
    logits = torch.randn(4, 32) * 20
    logits[:, 7] = 60.0  # the clear favourite of every row
    seen = torch.ones(4, 32, dtype=torch.bool)
    params = [
        p(temperature=5e-324),
        p(temperature=1.0, repetition_penalty=5e-324),
        p(temperature=1e-30, top_p=1e-300, repetition_penalty=5e-324),
        p(temperature=1.0),
    ]
    logits[3] = 0.0  # uniform: sampling, not argmax, decides this row
    picks = {tuple(sample_next(logits.clone(), params, [None] * 4, seen=seen)) for _ in range(20)}
    assert all(row[0] == 7 for row in picks)  # temperature 5e-324: greedy
    assert all(0 <= t < 32 for row in picks for t in row)
    assert len({row[3] for row in picks}) > 1  # the normal row still samples
