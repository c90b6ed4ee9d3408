"""Qwen3-style ``<think>…</think>`` handling for chat answers.

``ASOBA_REASONING=keep`` (default): the model's text is returned as it is, think block included,
in ``content`` -- what the model said, nothing hidden.
``ASOBA_REASONING=split``: the think block goes to ``reasoning_content`` (the field vLLM and
DeepSeek use) and ``content`` holds only the answer. Only the first block is reasoning; the
newlines after ``</think>`` are dropped. When the chat template already opened the block (the
prompt ends in ``<think>``, as Qwen3 thinking templates do), the text starts as reasoning.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


class ThinkSplitter:
    """Streams text into (reasoning, content) deltas without splitting a tag across chunks."""

    def __init__(self, *, in_reasoning: bool = False) -> None:
        self._in = in_reasoning
        self.had_reasoning = in_reasoning
        self._done = False  # after the first </think> everything is content
        self._held = ""
        self._strip = False  # drop newlines right after </think>

    @classmethod
    def for_prompt(cls, prompt: str) -> ThinkSplitter:
        return cls(in_reasoning=prompt.rstrip().endswith(OPEN))

    def feed(self, text: str) -> tuple[str, str]:
        buf = self._held + text
        self._held = ""
        reasoning = ""
        content = ""
        if self._in:
            idx = buf.find(CLOSE)
            if idx < 0:
                keep = _partial(buf, CLOSE)
                self._held = buf[len(buf) - keep :]
                return buf[: len(buf) - keep], ""
            reasoning, buf = buf[:idx], buf[idx + len(CLOSE) :]
            self._in, self._done, self._strip = False, True, True
        elif not self._done:
            stripped = buf.lstrip()
            if stripped.startswith(OPEN):  # a think block opens the answer
                self._in = self.had_reasoning = True
                return self.feed(stripped[len(OPEN) :])
            if OPEN.startswith(stripped):  # only whitespace or part of the tag so far
                self._held = buf
                return "", ""
            self._done = True  # the answer started without a think block
        content = buf
        if self._strip and content:
            content = content.lstrip("\n")
            self._strip = not content
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._in:
            return held, ""
        return "", held.lstrip("\n") if self._strip else held


def split_reasoning(text: str, *, in_reasoning: bool = False) -> tuple[str | None, str]:
    """Whole-text version: (reasoning or None when there was no think block, content)."""
    splitter = ThinkSplitter(in_reasoning=in_reasoning)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    return (r1 + r2 if splitter.had_reasoning else None), c1 + c2


def _partial(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
