"""Incremental detokenization and stop sequences (pure)."""

from __future__ import annotations

import pytest

from remote_service.engine.text import IncrementalDecoder, StopMatcher


# A byte-level toy: each id is one byte of UTF-8.
def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_decoder_holds_incomplete_utf8_until_complete() -> None:
    dec = IncrementalDecoder(byte_decode)
    out = [dec.push(b) for b in "é!".encode()]
    assert out == ["", "é", "!"]
    assert dec.flush() == ""


def test_decoder_flush_returns_what_is_held() -> None:
    dec = IncrementalDecoder(byte_decode)
    first = "é".encode()[0]
    assert dec.push(first) == ""
    assert dec.flush() == "\ufffd"


def test_decoder_uses_prompt_context_without_repeating_it() -> None:
    dec = IncrementalDecoder(byte_decode, prompt_ids=list(b"prompt text"))
    assert "".join(dec.push(b) for b in b" and more") == " and more"


@pytest.mark.parametrize(
    ("chunks", "stops", "emitted", "hit"),
    [
        (["Hello wor", "ld STOP here"], ["STOP"], "Hello world ", True),
        (["Hello ST", "OP"], ["STOP"], "Hello ", True),
        (["ab", "c"], ["x"], "abc", False),
        (["the end", "ing"], ["ending", "end"], "the ", True),
        (["no stops"], [], "no stops", False),
        (["S", "T", "O"], ["STOP"], "", False),
        (["S", "T", "A"], ["STOP"], "STA", False),
    ],
)
def test_stop_matcher(chunks: list[str], stops: list[str], emitted: str, hit: bool) -> None:
    m = StopMatcher(stops)
    out, stopped = [], False
    for chunk in chunks:
        text, stopped = m.feed(chunk)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == emitted
    assert stopped is hit


def test_stop_matcher_releases_partial_match_that_did_not_complete() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("wait ST") == ("wait ", False)
    assert m.feed("AY") == ("STAY", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"
