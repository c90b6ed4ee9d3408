"""SSE framing (pure)."""

from __future__ import annotations

import pytest

from remote_service.api import sse


def test_event_is_one_data_line_with_blank_line_after() -> None:
    frame = sse.event({"text": "two\nlines", "n": 1})
    assert frame == b'data: {"text":"two\\nlines","n":1}\n\n'
    assert frame.count(b"\n") == 2


def test_unicode_is_sent_as_utf8() -> None:
    assert sse.event({"t": "café"}) == 'data: {"t":"café"}\n\n'.encode()


def test_parse_round_trip_with_done() -> None:
    body = sse.event({"a": 1}) + sse.event({"b": [2]}) + sse.DONE
    assert sse.parse(body) == [{"a": 1}, {"b": [2]}, "[DONE]"]


def test_parse_rejects_non_data_events() -> None:
    with pytest.raises(ValueError, match="not an SSE data event"):
        sse.parse(b"event: x\n\n")
