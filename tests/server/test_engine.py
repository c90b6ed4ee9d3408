"""The engines in-process: batching correctness, cancellation, queue bound, stop handling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_service.engine import (
    Engine,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    build_engine,
)
from remote_service.engine.transformers_engine import TransformersEngine
from remote_service.settings import Settings

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. A model server answers requests.",
    "Numbers: 1 2 3",
    "Streaming sends each token to the client as soon as it is produced",
]


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> Iterator[TransformersEngine]:
    e = TransformersEngine(Settings(model_dir=demo_model_dir, max_num_seqs=8))
    e.load()
    yield e
    e.shutdown(1)


def greedy(max_tokens: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def run_many(engine: Engine, prompts: list[str], params: SamplingParams) -> list[str]:
    async def go() -> list[str]:
        reqs = [GenerationRequest(f"r{i}", engine.encode(p), params) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(engine.generate(r) for r in reqs))
        return [r.text for r in results]

    return asyncio.run(go())


def test_batched_greedy_matches_one_at_a_time_and_hf_generate(engine: TransformersEngine) -> None:
    import torch

    together = run_many(engine, PROMPTS, greedy())
    alone = [run_many(engine, [p], greedy())[0] for p in PROMPTS]
    assert together == alone

    tok, model = engine._tokenizer, engine._scheduler._runner._model  # type: ignore[union-attr]
    for prompt, text in zip(PROMPTS, together, strict=True):
        ids = torch.tensor([engine.encode(prompt)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=None,
            # rows of the padded embedding that the tokenizer cannot decode: never sampled
            suppress_tokens=list(range(len(tok), model.config.vocab_size)),
        )
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == text


def test_repetition_penalty_matches_hf_generate(engine: TransformersEngine) -> None:
    import torch

    tok, model = engine._tokenizer, engine._scheduler._runner._model  # type: ignore[union-attr]
    params = greedy(16, repetition_penalty=1.3)
    texts = run_many(engine, PROMPTS, params)
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = torch.tensor([engine.encode(prompt)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.3,
            eos_token_id=None,
            suppress_tokens=list(range(len(tok), model.config.vocab_size)),
        )
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == text
    assert texts != run_many(engine, PROMPTS, greedy(16))  # the penalty changed something


def test_sequences_joining_a_running_batch_stay_correct(engine: TransformersEngine) -> None:
    """A request that arrives mid-generation is merged into the batch without changing anyone."""
    alone = [run_many(engine, [p], greedy(40))[0] for p in PROMPTS[:2]]

    async def staggered() -> list[str]:
        first = asyncio.ensure_future(
            engine.generate(GenerationRequest("a", engine.encode(PROMPTS[0]), greedy(40)))
        )
        await asyncio.sleep(0.02)
        second = await engine.generate(
            GenerationRequest("b", engine.encode(PROMPTS[1]), greedy(40))
        )
        return [(await first).text, second.text]

    assert asyncio.run(staggered()) == alone


def test_seeded_sampling_is_reproducible(engine: TransformersEngine) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert run_many(engine, ["Hello"], params) == run_many(engine, ["Hello"], params)


def test_closing_a_stream_frees_its_slot(engine: TransformersEngine) -> None:
    async def go() -> None:
        ids = engine.encode("Hello")
        deltas = await engine.stream(GenerationRequest("c", ids, greedy(2000)))
        await deltas.__anext__()
        assert engine.stats().running == 1
        deltas.close()
        deadline = time.monotonic() + 5
        while engine.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.stats().running == 0

    asyncio.run(go())


def test_length_is_capped_by_the_context(demo_model_dir: Path) -> None:
    e = TransformersEngine(Settings(model_dir=demo_model_dir, max_model_len=20, warmup=False))
    e.load()
    try:
        ids = e.encode("one two three")
        result = asyncio.run(e.generate(GenerationRequest("x", ids, greedy(100))))
        assert result.finish_reason == "length"
        assert result.prompt_tokens + result.completion_tokens == 20
    finally:
        e.shutdown(1)


# --- the mock engine: same scheduler, no model -----------------------------------------------


def mock(**kw: object) -> Engine:
    e = build_engine(Settings(backend="mock", **kw))  # type: ignore[arg-type]
    e.load()
    return e


def test_mock_echoes_and_stops_on_stop_sequences() -> None:
    e = mock(mock_token_delay=0)
    try:
        ids = e.encode("alpha beta gamma delta")
        out = asyncio.run(e.generate(GenerationRequest("m", ids, greedy(6))))
        assert out.text == " alpha beta gamma delta alpha beta"
        assert (out.finish_reason, out.completion_tokens) == ("length", 6)
        stopped = asyncio.run(e.generate(GenerationRequest("s", ids, greedy(6, stop=("gam",)))))
        assert stopped.text == " alpha beta "
        assert stopped.finish_reason == "stop"
    finally:
        e.shutdown(1)


def test_full_queue_is_refused_at_once() -> None:
    e = mock(max_num_seqs=1, max_queue=1, mock_token_delay=0.01)

    async def go() -> None:
        ids = e.encode("a b c")
        held = [await e.stream(GenerationRequest(f"q{i}", ids, greedy(10_000))) for i in range(2)]
        with pytest.raises(QueueFullError) as info:
            await e.stream(GenerationRequest("q3", ids, greedy(1)))
        assert info.value.retry_after_s >= 1
        for d in held:
            d.close()

    try:
        asyncio.run(go())
    finally:
        e.shutdown(1)


def test_a_request_withdrawn_while_queued_frees_its_queue_place() -> None:
    e = mock(max_num_seqs=1, max_queue=1, mock_token_delay=0.01)

    async def go() -> None:
        ids = e.encode("a b c")
        running = await e.stream(GenerationRequest("run", ids, greedy(10_000)))
        await running.__anext__()  # admitted: it holds the only slot
        queued = await e.stream(GenerationRequest("wait", ids, greedy(5)))
        assert e.stats().waiting == 1
        queued.close()  # its client went away before it got a slot
        assert e.stats().waiting == 0
        # The place is free at once for a live request, not only when the slot frees.
        nxt = await e.stream(GenerationRequest("next", ids, greedy(5)))
        deadline = time.monotonic() + 5
        while e.stats().requests_finished < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the worker drops the withdrawn one (warm-up was 1st)
        assert e.stats().requests_finished == 2
        assert e.stats().waiting == 1
        for d in (running, nxt):
            d.close()

    try:
        asyncio.run(go())
    finally:
        e.shutdown(1)


def test_a_chat_template_that_refuses_is_a_value_error(engine: TransformersEngine) -> None:
    template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        engine.render_chat([{"role": "user", "content": "hi"}], {"chat_template": template})
