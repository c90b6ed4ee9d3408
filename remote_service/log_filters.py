"""Logging that a hostile client cannot flood or forge.

- ``RateLimitFilter``: a warning or error with the same source and template is written at most
  once per ``period`` seconds; the next one that gets through says how many were dropped. Out
  of file descriptors, asyncio logs every failed ``accept()``: that was 36,656 lines in 6 s.
- ``printable``: control characters (CR, LF, ESC, ...) escaped as ``\\xNN``, for anything a
  client chose (a path, a field name) before it goes into a log line.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 512) -> str:
    escaped = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


class RateLimitFilter(logging.Filter):
    def __init__(
        self,
        period: float = 10.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        super().__init__()
        self.period = period
        self.level = level
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return False
            self._last[key] = now
            dropped = self._dropped.pop(key, 0)
            if len(self._last) > 10_000:  # bounded: forget the oldest templates
                for old in sorted(self._last, key=self._last.__getitem__)[:5_000]:
                    self._last.pop(old, None)
        if dropped:
            record.msg = (
                f"{record.msg} ({dropped} similar messages in the last {self.period:g}s dropped)"
            )
        return True
