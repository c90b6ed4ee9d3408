"""``ASOBA_BACKEND=mock``: the whole serving path without a model, for wiring checks.

Tokens are whitespace-separated words. The mock *echoes*: it generates the prompt's words again,
cyclically, one word per decode step (all running sequences advance together, after
``ASOBA_MOCK_TOKEN_DELAY`` seconds). For chat, the prompt is the last message's content, so a
client controls the output exactly. It batches, queues, streams, cancels and stops on stop
sequences through the same scheduler as the real engine, and says ``backend: mock`` in /status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping
from typing import Any

from remote_service.engine.base import EngineInfo, EngineObserver, GenerationDefaults
from remote_service.engine.batched import BatchedEngine, Loaded
from remote_service.engine.scheduler import Sequence
from remote_service.settings import Settings

MOCK_EOS = 0
MOCK_MAX_MODEL_LEN = 8192


class WordCodec:
    """A growing word vocabulary; id 0 is the end-of-sequence token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._words: list[str] = ["</s>"]

    def encode(self, text: str) -> list[int]:
        with self._lock:
            out = []
            for word in text.split():
                if word not in self._ids:
                    self._ids[word] = len(self._words)
                    self._words.append(word)
                out.append(self._ids[word])
            return out

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return " ".join(self._words[i] for i in ids if 0 < i < len(self._words))


class EchoRunner:
    """A BatchRunner that repeats each prompt, taking ``delay`` seconds per batched step."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._rows: list[Sequence] = []
        self._joining: list[Sequence] = []

    def _next(self, seq: Sequence) -> int:
        prompt = list(seq.request.prompt_ids)
        return prompt[len(seq.generated) % len(prompt)] if prompt else MOCK_EOS

    def add(self, seqs: list[Sequence]) -> None:
        self._joining.extend(seqs)

    def step(self) -> list[tuple[Sequence, int]]:
        """The joining prompts "prefill" in this step and give their first word; the others
        decode one word each."""
        joined, self._joining = self._joining, []
        pairs = self.decode()
        self._rows.extend(joined)
        return [(s, self._next(s)) for s in joined] + pairs

    def decode(self) -> list[tuple[Sequence, int]]:
        time.sleep(self._delay)
        return [(s, self._next(s)) for s in self._rows]

    def release(self, seqs: Collection[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        self._rows = [s for s in self._rows if id(s) not in gone]
        self._joining = [s for s in self._joining if id(s) not in gone]

    def reset(self) -> None:
        self._rows, self._joining = [], []


class MockEngine(BatchedEngine):
    def __init__(self, settings: Settings, observer: EngineObserver | None = None) -> None:
        super().__init__(settings, observer)
        self._codec = WordCodec()

    def _load_model(self) -> Loaded:
        max_len = min(self.settings.max_model_len or MOCK_MAX_MODEL_LEN, MOCK_MAX_MODEL_LEN)
        info = EngineInfo(
            backend="mock",
            model_name=self.settings.served_model_name,
            device="cpu",
            dtype="none",
            quantization="none",
            max_model_len=max_len,
            max_num_seqs=self.settings.max_num_seqs,
            versions={},
        )
        return Loaded(
            runner=EchoRunner(self.settings.mock_token_delay),
            eos_ids=[MOCK_EOS],
            info=info,
            defaults=GenerationDefaults(temperature=0.0),
        )

    def _decode(self, ids: list[int]) -> str:
        return self._codec.decode(ids)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._codec.encode(text)

    def render_chat(
        self, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
    ) -> str:
        return messages[-1]["content"] if messages else ""
