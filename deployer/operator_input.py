"""Turning pydantic's errors into one readable line with a path, and "did you mean"."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from .errors import DeployError


def within(path: str, root: str) -> bool:
    """``path`` is ``root`` or inside it, compared by POSIX path components."""
    parts, top = PurePosixPath(path).parts, PurePosixPath(root).parts
    return parts[: len(top)] == top


def printable(text: str) -> str:
    """``text`` with every non-printable character (newline, NUL, ESC, U+2028...) written as
    its escape, so a message built from operator input stays one line and cannot drive the
    terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def read_operator_file(path: Path, *, kind: str, label: str, error: type[DeployError]) -> str:
    """The UTF-8 text of an operator's file (the catalog, the config), or ``error`` with one
    line: ``cannot read <kind> <path>: ...`` or ``<label>: not UTF-8 text``."""
    shown = printable(str(path))
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {kind} {shown}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{label}: not UTF-8 text (byte {exc.start})") from None
    except ValueError:  # a NUL in the path
        raise error(f"cannot read {kind} {shown}: not a usable path") from None


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = close_matches(word, candidates)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


def describe(err: ValidationError, *, prefix: str = "", source: str = "") -> str:
    """One line per problem, ``source: a.b.c: reason``; the first problem leads."""
    parts: list[str] = []
    for item in err.errors(include_url=False):
        loc = [str(p) for p in item["loc"] if p not in ("__root__",)]
        path = ".".join(([prefix] if prefix else []) + loc)
        msg = item["msg"]
        if item["type"] == "extra_forbidden" and loc:
            msg = "unknown key"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        where = f"{source}: " if source else ""
        parts.append(f"{where}{path}: {msg}" if path else f"{where}{msg}")
    return printable("; ".join(parts))
