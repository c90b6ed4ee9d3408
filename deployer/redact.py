"""Secrets that cannot leak by accident, and a redactor for anything that is logged.

A ``Secret`` holds a value (the service API key) that must reach exactly one place: a 0600
file on the host, sent over stdin. It prints, formats and reprs as ``[REDACTED]``; only
``reveal()`` gives the value, so every use of the real value is greppable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"
#: Keys whose values are never logged, whatever they hold.
SENSITIVE_KEY_RE = re.compile(
    r"(api[_-]?key|secret|token|password|passwd|credential|authorization|private[_-]?key)",
    re.IGNORECASE,
)
#: Values that look like credentials wherever they appear.
SENSITIVE_VALUE_RES = (
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}\b"),  # API keys in the OpenAI style
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
)


class Secret:
    """A string that is never shown: ``str``, ``repr`` and f-strings all give [REDACTED]."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError("Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __copy__(self) -> Secret:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not pickled")


class Redactor:
    """Scrubs known secret values, sensitive keys and credential-shaped strings."""

    def __init__(self, secrets: Iterable[Secret | str] = ()) -> None:
        values = {s.reveal() if isinstance(s, Secret) else s for s in secrets}
        # Longest first, so a secret containing another is replaced whole.
        self._values = sorted((v for v in values if len(v) >= 4), key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._values:
            value = value.replace(secret, REDACTED)
        for pattern in SENSITIVE_VALUE_RES:
            value = pattern.sub(REDACTED, value)
        return value

    def __call__(self, obj: Any) -> Any:
        """A copy of ``obj`` (JSON-like data) with every secret replaced."""
        if isinstance(obj, Secret):
            return REDACTED
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {
                str(k): REDACTED
                if SENSITIVE_KEY_RE.search(str(k)) and v not in (None, "", False)
                else self(v)
                for k, v in obj.items()
            }
        if isinstance(obj, list | tuple | set | frozenset):
            return [self(v) for v in obj]
        return obj


def redact(obj: Any, secrets: Iterable[Secret | str] = ()) -> Any:
    return Redactor(secrets)(obj)
