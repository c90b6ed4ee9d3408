"""The slot KV cache and chunked prefill, driven step by step on the demo model (fp32, CPU).

The runner is driven directly (no worker thread), so when rows join and leave is exact: each
case is reproducible, and the tokens of every row are compared with one-at-a-time
``model.generate()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from remote_service.engine import GenerationRequest, SamplingParams
from remote_service.engine.sampling import RowParams, row_params, sample_tokens
from remote_service.engine.scheduler import Sequence
from remote_service.engine.text import IncrementalDecoder, StopMatcher
from remote_service.engine.torch_runner import TorchBatchRunner
from remote_service.engine.transformers_engine import TransformersEngine
from remote_service.settings import Settings

TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. A model server answers requests.",
    "Numbers: 1 2 3",
    "Streaming sends each token to the client as soon as it is produced",
    "Health checks must keep answering while the model is busy generating text for clients. "
    "Batching several sequences together keeps the accelerator busy and raises throughput.",
]


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> Iterator[TransformersEngine]:
    """The demo model and tokenizer (the engine's own loading path); its runner is unused."""
    e = TransformersEngine(Settings(model_dir=demo_model_dir, max_num_seqs=1, warmup=False))
    e.load()
    yield e
    e.shutdown(1)


def model_of(engine: TransformersEngine) -> Any:
    return engine._scheduler._runner._model  # type: ignore[union-attr]


def make_runner(engine: TransformersEngine, *, slots: int, chunk: int) -> TorchBatchRunner:
    tok = engine._tokenizer
    return TorchBatchRunner(
        model_of(engine),
        pad_id=int(tok.pad_token_id),
        vocab_size=len(tok),
        max_num_seqs=slots,
        max_model_len=engine.info.max_model_len,
        prefill_chunk=chunk,
    )


def make_seq(ids: list[int], params: SamplingParams) -> Sequence:
    loop = asyncio.new_event_loop()
    loop.close()  # never used: the runner does not deliver anything
    return Sequence(
        request=GenerationRequest("t", ids, params),
        loop=loop,
        queue=asyncio.Queue(),
        decoder=IncrementalDecoder(lambda _: "", ids),
        stop=StopMatcher(()),
    )


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def reference(
    engine: TransformersEngine, ids: list[int], n: int, penalty: float = 1.0
) -> list[int]:
    model, tok = model_of(engine), engine._tokenizer
    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        repetition_penalty=penalty,
        eos_token_id=None,
        suppress_tokens=list(range(len(tok), model.config.vocab_size)),
    )
    return [int(t) for t in out[0, len(ids) :]]


def drive(runner: TorchBatchRunner, plan: dict[int, list[Sequence]]) -> None:
    """Step until every sequence has its ``max_tokens``; ``plan[k]`` arrives before step k
    and joins as soon as a slot is free. A sequence leaves (``release``) as soon as it has its
    tokens, as the scheduler does.
    """
    live: list[Sequence] = []
    waiting: list[Sequence] = []
    step = 0
    while live or waiting or any(k >= step for k in plan):
        waiting.extend(plan.get(step, []))
        free = runner.shape.slots - runner.batch_size
        if waiting and free:
            joining, waiting = waiting[:free], waiting[free:]
            runner.add(joining)
            live.extend(joining)
        finished = []
        for seq, token in runner.step():
            seq.generated.append(token)
            if len(seq.generated) >= seq.request.params.max_tokens:
                finished.append(seq)
        runner.release(finished)
        live = [s for s in live if s not in finished]
        step += 1
        assert step < 500, "the runner stopped making progress"
    assert runner.batch_size == 0


def test_rows_joining_and_leaving_match_one_at_a_time_generate(
    loaded: TransformersEngine,
) -> None:
    """Three slots for five sequences: slots are reused, rows move when others leave, long
    prompts are prefilled in chunks of 8 tokens while the others decode."""
    ids = [loaded.encode(t) for t in TEXTS]
    assert max(len(i) for i in ids) > 3 * 8  # at least one prompt spans several chunks
    lengths = [30, 7, 22, 15, 12]
    seqs = [make_seq(i, greedy(n)) for i, n in zip(ids, lengths, strict=True)]
    runner = make_runner(loaded, slots=3, chunk=8)
    drive(runner, {0: seqs[:2], 3: [seqs[2]], 9: [seqs[3]], 10: [seqs[4]]})
    for seq, prompt, n in zip(seqs, ids, lengths, strict=True):
        assert seq.generated == reference(loaded, prompt, n), seq.request.prompt_ids


def test_the_repetition_penalty_matches_generate_mid_batch(loaded: TransformersEngine) -> None:
    ids = [loaded.encode(t) for t in TEXTS[:3]]
    seqs = [make_seq(i, greedy(16, repetition_penalty=1.3)) for i in ids]
    plain = make_seq(ids[0], greedy(16))  # a row without the penalty, in the same batch
    runner = make_runner(loaded, slots=4, chunk=16)
    drive(runner, {0: [seqs[0], plain], 2: seqs[1:]})
    for seq, prompt in zip(seqs, ids, strict=True):
        assert seq.generated == reference(loaded, prompt, 16, penalty=1.3)
    assert plain.generated == reference(loaded, ids[0], 16)
    assert plain.generated != seqs[0].generated  # the penalty did change something


def test_a_seeded_row_draws_the_same_tokens_alone_or_in_a_changing_batch(
    loaded: TransformersEngine,
) -> None:
    ids = loaded.encode(TEXTS[1])
    sampled = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    plain = SamplingParams(max_tokens=24, temperature=1.0, seed=11)  # no sort path

    def run(plan_for: dict[int, list[Sequence]], runner: TorchBatchRunner) -> None:
        drive(runner, plan_for)

    alone = [make_seq(ids, sampled), make_seq(ids, plain)]
    run({0: [alone[0]], 1: [alone[1]]}, make_runner(loaded, slots=4, chunk=64))
    crowd = [make_seq(ids, sampled), make_seq(ids, plain)]
    others = [make_seq(loaded.encode(t), SamplingParams(max_tokens=5)) for t in TEXTS[2:]]
    run(
        {0: [others[0], crowd[0]], 3: [crowd[1], others[1]], 4: [others[2]]},
        make_runner(loaded, slots=4, chunk=8),
    )
    assert crowd[0].generated == alone[0].generated
    assert crowd[1].generated == alone[1].generated
    assert alone[0].generated != alone[1].generated


def test_a_released_row_frees_its_slot(loaded: TransformersEngine) -> None:
    ids = [loaded.encode(t) for t in TEXTS[:3]]
    runner = make_runner(loaded, slots=2, chunk=512)
    a, b = make_seq(ids[0], greedy(50)), make_seq(ids[1], greedy(50))
    runner.add([a, b])
    for _ in range(3):
        for seq, token in runner.step():
            seq.generated.append(token)
    with pytest.raises(RuntimeError, match="slots"):
        runner.add([make_seq(ids[2], greedy(5))])
    runner.release([a])  # cancelled mid-generation: its slot goes to the next request
    c = make_seq(ids[2], greedy(8))
    runner.add([c])
    while len(c.generated) < 8:
        for seq, token in runner.step():
            seq.generated.append(token)
    assert c.generated == reference(loaded, ids[2], 8)
    assert b.generated == reference(loaded, ids[1], len(b.generated))


def test_a_decode_step_reads_the_device_once(
    loaded: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way a tensor's value reaches Python is counted: one read, the sampled ids."""
    runner = make_runner(loaded, slots=4, chunk=512)
    params = [
        greedy(20),
        greedy(20, repetition_penalty=1.2),
        SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=3),
        SamplingParams(max_tokens=20, temperature=0.8),
    ]
    seqs = [make_seq(loaded.encode(t), p) for t, p in zip(TEXTS, params, strict=False)]
    runner.add(seqs)
    runner.step()  # prefill
    reads: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: Any, _o: Any = original, _n: str = name) -> Any:
            reads.append(_n)
            return _o(self, *a)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(3):
        reads.clear()
        assert len(runner.step()) == 4
        assert reads == ["tolist"]


def test_rows_without_top_k_or_top_p_skip_the_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=0.7),
        SamplingParams(max_tokens=1, temperature=0.7, seed=1),
    ]
    logits = torch.randn(3, 50)
    rows: RowParams = row_params(params, "cpu")

    def no_sort(*_: Any, **__: Any) -> Any:
        raise AssertionError("sorted a row that does not filter")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    gens = [None, None, torch.Generator().manual_seed(1)]
    out = sample_tokens(logits.clone(), params, gens, rows)
    assert out.shape == (3,) and int(out[0]) == int(logits[0].argmax())


def test_the_cache_is_what_the_estimator_plans(demo_model_dir: Path) -> None:
    """ASOBA_MAX_NUM_SEQS x ASOBA_MAX_MODEL_LEN, as rendered from the plan, in bf16 (the
    estimator's 2-byte entries): the allocation equals the estimate's KV term to the byte."""
    import json

    from deployer.catalog import load_catalog
    from deployer.config import PolicyConfig
    from deployer.estimate import estimate
    from deployer.model_meta import parse_header
    from tests.model_metadata import meta_from_tensors

    shards = []
    for path in sorted(demo_model_dir.glob("*.safetensors")):
        raw = path.read_bytes()
        tensors, _ = parse_header(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        shards.append(tensors)
    config = json.loads((demo_model_dir / "config.json").read_text())
    spec = load_catalog().models["demo-tiny"]
    policy = PolicyConfig(context_tokens=512, concurrent_seqs=3)
    est = estimate(meta_from_tensors(spec, config, shards), spec, policy)

    engine = TransformersEngine(
        Settings(
            model_dir=demo_model_dir,
            dtype="bfloat16",
            max_num_seqs=est.concurrent_seqs,
            max_model_len=est.context_tokens,
            warmup=False,
        )
    )
    engine.load()
    try:
        runner = engine._scheduler._runner  # type: ignore[union-attr]
        assert isinstance(runner, TorchBatchRunner)
        assert runner.cache.nbytes == est.needs["none"].kv_cache_bytes
        assert runner.cache.keys[0].dtype == torch.bfloat16
    finally:
        engine.shutdown(1)
