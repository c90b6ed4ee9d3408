"""<think> handling (pure)."""

from __future__ import annotations

import pytest

from remote_service.api.reasoning import ThinkSplitter, split_reasoning


@pytest.mark.parametrize(
    ("text", "in_reasoning", "reasoning", "content"),
    [
        ("<think>\nplan\n</think>\n\nThe answer.", False, "\nplan\n", "The answer."),
        ("plain answer", False, None, "plain answer"),
        ("answer with <think>late</think> tag", False, None, "answer with <think>late</think> tag"),
        ("opened by the template</think>\nanswer", True, "opened by the template", "answer"),
        ("<think>never closed", False, "never closed", ""),
        ("  <think>x</think>y", False, "x", "y"),
    ],
)
def test_split_reasoning(
    text: str, in_reasoning: bool, reasoning: str | None, content: str
) -> None:
    assert split_reasoning(text, in_reasoning=in_reasoning) == (reasoning, content)


def test_streaming_split_never_leaks_part_of_a_tag() -> None:
    s = ThinkSplitter()
    chunks = ["<th", "ink>rea", "son</th", "ink>", "\n", "\nHi", " there"]
    pairs = [s.feed(c) for c in chunks] + [s.flush()]
    assert "".join(r for r, _ in pairs) == "reason"
    assert "".join(c for _, c in pairs) == "Hi there"
    assert all("<" not in r and "<" not in c for r, c in pairs)


def test_for_prompt_detects_a_template_that_opens_the_block() -> None:
    assert ThinkSplitter.for_prompt("<|im_start|>assistant\n<think>\n").had_reasoning
    assert not ThinkSplitter.for_prompt("<|im_start|>assistant\n").had_reasoning
