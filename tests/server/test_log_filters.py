"""Log lines a client cannot flood or forge (remote_service/log_filters.py)."""

from __future__ import annotations

import logging

import pytest

from remote_service.log_filters import RateLimitFilter, printable


def record(msg: str, level: int = logging.ERROR, name: str = "asyncio") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_a_repeated_error_is_written_once_per_period_with_a_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    f = RateLimitFilter(period=10.0, clock=lambda: now[0])
    accept = "socket.accept() out of system resource"
    assert f.filter(record(accept))
    assert sum(f.filter(record(accept)) for _ in range(36_656)) == 0
    assert f.filter(record("another message"))  # a different template is not held back
    now[0] += 10.5
    later = record(accept)
    assert f.filter(later)
    assert "36656 similar messages in the last 10s dropped" in later.getMessage()


def test_info_lines_are_never_dropped() -> None:
    f = RateLimitFilter(period=10.0)
    assert all(f.filter(record("GET /health 200", logging.INFO)) for _ in range(100))


def test_printable_escapes_control_characters() -> None:
    assert printable("/a\nb\r\x1b[31m") == "/a\\x0ab\\x0d\\x1b[31m"
    assert printable("x" * 600).endswith("...") and len(printable("x" * 600)) == 515
