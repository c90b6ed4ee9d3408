"""Continuous batching on a dedicated worker thread.

The event loop never runs the model. ``submit`` puts a request on a bounded wait queue (or raises
at once when it is full) and returns a :class:`DeltaStream`. The worker thread loops:

1. drop sequences whose client went away, running or still waiting (their slot or queue place
   frees at once);
2. admit waiting requests into free slots (up to ``max_num_seqs``);
3. run one runner step: a chunk of the admitted prompts' prefill, and one decode step for every
   generating sequence as one batch (a long prompt is spread over steps, never stalling them);
4. turn each new token into text (stop sequences, EOS, length) and hand it to the event loop
   with ``call_soon_threadsafe``.

New requests join between decode steps, finished ones leave, so the batch is continuous. The
model-specific work (KV cache, sampling) lives behind :class:`BatchRunner`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from remote_service.engine.base import (
    Delta,
    EngineNotReadyError,
    EngineObserver,
    EngineStats,
    GenerationRequest,
    QueueFullError,
)
from remote_service.engine.text import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)

_MAX_CONSECUTIVE_FAILURES = 3
_RATE_WINDOW_S = 5.0


@dataclass(eq=False)
class Sequence:
    """One request in flight. Identity (not value) equality: runners key rows on it."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta]
    decoder: IncrementalDecoder
    stop: StopMatcher
    arrived: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    admitted: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    runner_state: Any = None  # e.g. a seeded torch.Generator

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.generated[-1] if self.generated else self.request.prompt_ids[-1]


class BatchRunner(Protocol):
    """Model side of the batch. Called from the worker thread only."""

    def add(self, seqs: list[Sequence]) -> None:
        """Give ``seqs`` a place in the batch; their prompts are prefilled by later steps."""
        ...

    def step(self) -> list[tuple[Sequence, int]]:
        """One scheduling step: a slice of pending prefill work and one decode step for every
        generating sequence. Returns (sequence, next token) pairs: each generating sequence's
        next token, and the first token of each sequence whose prefill completed."""
        ...

    def release(self, seqs: Collection[Sequence]) -> None:
        """Remove finished or cancelled sequences from the batch."""
        ...

    def reset(self) -> None:
        """Forget the whole batch (after a failure)."""
        ...


class DeltaStream:
    """Async iterator over one request's deltas. ``close`` (or leaving early) frees its slot."""

    def __init__(
        self, seq: Sequence, queue: asyncio.Queue[Delta], wake: Callable[[], None]
    ) -> None:
        self._seq = seq
        self._queue = queue
        self._wake = wake
        self._done = False

    def __aiter__(self) -> DeltaStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        delta = await self._queue.get()
        # A consumer that fell behind gets everything pending as one delta: fewer, larger
        # SSE events instead of a backlog of one-token events.
        while delta.finish_reason is None and not self._queue.empty():
            nxt = self._queue.get_nowait()
            delta = Delta(
                delta.text + nxt.text,
                nxt.completion_tokens,
                nxt.prompt_tokens,
                nxt.finish_reason,
                nxt.error,
            )
        if delta.finish_reason is not None:
            self._done = True
            self.close()
        return delta

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the request unless it already finished; safe to call more than once."""
        self._done = True
        if not self._seq.cancelled:
            self._seq.cancelled = True
            self._wake()


class BatchScheduler:
    """Owns the wait queue, the worker thread and the per-request plumbing."""

    def __init__(
        self,
        runner: BatchRunner,
        *,
        decode: Callable[[list[int]], str],
        eos_ids: Iterable[int],
        max_num_seqs: int,
        max_queue: int,
        max_model_len: int,
        observer: EngineObserver | None = None,
        name: str = "engine",
    ) -> None:
        self._runner = runner
        self._decode = decode
        self._eos = frozenset(eos_ids)
        self._max_num_seqs = max_num_seqs
        self._max_queue = max_queue
        self._max_model_len = max_model_len
        self._observer = observer
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._accepting = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"{name}-worker", daemon=True)
        self.fatal_error: str | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]]
        self._outbox = {}
        self._finished = 0
        self._tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # --- event-loop side --------------------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal_error is None

    def stats(self) -> EngineStats:
        now = time.perf_counter()
        recent = [n for t, n in list(self._recent) if now - t <= _RATE_WINDOW_S]
        return EngineStats(
            running=len(self._running),
            waiting=_live(list(self._waiting)),
            requests_finished=self._finished,
            tokens_generated=self._tokens,
            tokens_per_s=round(sum(recent) / _RATE_WINDOW_S, 2),
        )

    def submit(self, request: GenerationRequest) -> DeltaStream:
        """Queue ``request``; raise at once if it cannot be taken. Call from the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        seq = Sequence(
            request=request,
            loop=loop,
            queue=queue,
            decoder=IncrementalDecoder(self._decode, request.prompt_ids),
            stop=StopMatcher(request.params.stop),
        )
        with self._cond:
            if not self._accepting or not self.alive:
                raise EngineNotReadyError(
                    self.fatal_error or "the engine is not accepting requests"
                )
            free = max(0, self._max_num_seqs - len(self._running))
            # A client that left while queued does not hold its place: the worker drops it at
            # its next step, but until then it must not turn a live request away.
            waiting = _live(self._waiting)
            if waiting >= self._max_queue + free:
                raise QueueFullError(
                    f"server busy: {len(self._running)} running, {waiting} waiting",
                    retry_after_s=1,
                )
            self._waiting.append(seq)
            self._cond.notify()
        return DeltaStream(seq, queue, self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def shutdown(self, timeout: float) -> None:
        """Refuse new work, let running sequences finish for ``timeout`` s, then abort the rest."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.monotonic() + timeout
        while (self._running or self._waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # --- worker side ------------------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait(timeout=0.5)
                if self._stop:
                    break
            try:
                self._step()
                failures = 0
            except Exception as exc:  # a device error: fail the batch, keep serving
                failures += 1
                log.exception("generation step failed")
                self._fail_running(f"generation failed: {type(exc).__name__}: {exc}")
                if failures >= _MAX_CONSECUTIVE_FAILURES:
                    self.fatal_error = f"engine stopped after repeated failures: {exc}"
                    break
            finally:
                self._flush()
        self._abort_all("server shutting down" if self.fatal_error is None else self.fatal_error)
        self._flush()

    def _post(self, seq: Sequence, delta: Delta) -> None:
        self._outbox.setdefault(seq.loop, []).append((seq.queue, delta))

    def _flush(self) -> None:
        """Hand this step's deltas to their event loops: one wake-up per loop, not per token."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)

    def _step(self) -> None:
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._running.extend(admitted)
            now = time.perf_counter()
            for seq in admitted:
                seq.admitted = now
            self._runner.add(admitted)
        if self._running:
            self._emit(self._runner.step())

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        left: list[Sequence] = []  # clients that went away since _drop_cancelled looked
        too_long: list[Sequence] = []  # no room for a single new token
        with self._cond:
            while self._waiting and len(self._running) + len(admitted) < self._max_num_seqs:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    left.append(seq)
                elif seq.prompt_len >= self._max_model_len:
                    too_long.append(seq)
                else:
                    admitted.append(seq)
        for seq in left:
            self._finish(seq, "abort")
        for seq in too_long:
            self._finish(seq, "length")
        return admitted

    def _drop_cancelled(self) -> None:
        with self._cond:
            left = [s for s in self._waiting if s.cancelled]
            if left:
                self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        for seq in left:  # never admitted: nothing to release in the runner
            self._finish(seq, "abort")
        gone = [s for s in self._running if s.cancelled]
        if gone:
            self._finish_many(gone, "abort")

    def _emit(self, pairs: list[tuple[Sequence, int]]) -> None:
        now = time.perf_counter()
        done: list[tuple[Sequence, str]] = []
        for seq, token in pairs:
            if seq.cancelled:  # the client left; the next step drops it from the batch
                continue
            reason = self._on_token(seq, token, now)
            if reason is not None:
                done.append((seq, reason))
        self._tokens += len(pairs)
        self._recent.append((now, len(pairs)))
        while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()
        if done:
            self._runner.release([s for s, _ in done])
            self._running = [s for s in self._running if all(s is not d for d, _ in done)]

    def _on_token(self, seq: Sequence, token: int, now: float) -> str | None:
        """Record ``token`` for ``seq``, deliver its text; return a finish reason if it is done."""
        obs = self._observer
        if seq.first_token_at is None:
            seq.first_token_at = now
            if obs:
                obs.first_token(now - seq.arrived)
        elif obs and seq.last_token_at is not None:
            obs.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        params = seq.request.params
        if token in self._eos and not params.ignore_eos:
            return self._finish(seq, "stop", extra=seq.decoder.flush() + seq.stop.flush())
        seq.generated.append(token)
        text, hit = seq.stop.feed(seq.decoder.push(token))
        if hit:
            return self._finish(seq, "stop", extra=text)
        n = len(seq.generated)
        if n >= params.max_tokens or seq.prompt_len + n >= self._max_model_len:
            tail = seq.stop.feed(seq.decoder.flush())[0]
            return self._finish(seq, "length", extra=text + tail + seq.stop.flush())
        if text:
            self._post(seq, Delta(text, n, seq.prompt_len))
        return None

    def _finish(self, seq: Sequence, reason: str, extra: str = "", error: str | None = None) -> str:
        seq.cancelled = True  # marks it done for the iterator's cleanup
        self._finished += 1
        if self._observer:  # before delivering: metrics are final when the client sees the end
            end = time.perf_counter()
            queued = (seq.admitted or end) - seq.arrived
            self._observer.finished(
                reason, seq.prompt_len, len(seq.generated), end - seq.arrived, queued
            )
        self._post(seq, Delta(extra, len(seq.generated), seq.prompt_len, reason, error))
        return reason

    def _finish_many(self, seqs: list[Sequence], reason: str, error: str | None = None) -> None:
        for seq in seqs:
            self._finish(seq, reason, error=error)
        with contextlib.suppress(Exception):
            self._runner.release(seqs)
        self._running = [s for s in self._running if all(s is not d for d in seqs)]

    def _fail_running(self, message: str) -> None:
        seqs, self._running = self._running, []
        for seq in seqs:
            self._finish(seq, "error", error=message)
        with contextlib.suppress(Exception):
            self._runner.reset()

    def _abort_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._accepting = False
        for seq in [*self._running, *waiting]:
            self._finish(seq, "abort", error=message)
        self._running = []
        with contextlib.suppress(Exception):
            self._runner.reset()


def _live(seqs: Iterable[Sequence]) -> int:
    """How many of ``seqs`` still have a client."""
    return sum(1 for s in seqs if not s.cancelled)


def _put_all(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)
