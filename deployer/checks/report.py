"""What a check answers and how the answers add up: rows, the report, the options, and the
guard that turns one check's crash into failed rows instead of a stopped run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import DeployError
from ..operator_input import did_you_mean

Status = Literal["pass", "warn", "fail"]

GB = 1_000_000_000

GROUPS: tuple[str, ...] = (
    "config",
    "ssh",
    "sudo",
    "resources",
    "systemd",
    "python",
    "s3",
    "health",
)
#: Every row each group reports, in order (for rows that could not run).
ROWS: dict[str, tuple[str, ...]] = {
    "config": ("config", "config.key_file", "config.catalog"),
    "ssh": ("ssh",),
    "sudo": ("sudo",),
    "resources": (
        "resources.ram",
        "resources.disk",
        "resources.gpu",
        "resources.flux",
        "resources.inference",
    ),
    "systemd": ("systemd.units", "systemd.reload", "systemd.journal"),
    "python": ("python", "python.torch", "python.engine"),
    "s3": ("s3.credentials", "s3.bucket", "s3.models", "s3.host_credentials", "s3.host_reach"),
    "health": ("health",),
}
#: Rows answered from the operator's machine (the rest need the host).
OPERATOR_ROWS = frozenset({"s3.credentials", "s3.bucket", "s3.models", *ROWS["config"]})


@dataclass(frozen=True)
class CheckResult:
    """One row of the report."""

    name: str
    status: Status
    value: str
    remedy: str | None = None
    duration_s: float = 0.0

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "value": self.value,
            "remedy": self.remedy,
            "duration_s": round(self.duration_s, 3),
        }


def ok(name: str, value: str, duration_s: float = 0.0) -> CheckResult:
    return CheckResult(name, "pass", value, None, duration_s)


def warn(name: str, value: str, remedy: str, duration_s: float = 0.0) -> CheckResult:
    return CheckResult(name, "warn", value, remedy, duration_s)


def fail(name: str, value: str, remedy: str, duration_s: float = 0.0) -> CheckResult:
    return CheckResult(name, "fail", value, remedy, duration_s)


def not_checked(names: Iterable[str], reason: str, remedy: str) -> list[CheckResult]:
    return [fail(name, f"not checked: {reason}", remedy) for name in names]


@dataclass(frozen=True)
class Report:
    """Every row, in the documented order, and the verdict they add up to."""

    results: tuple[CheckResult, ...]
    strict: bool = False
    duration_s: float = 0.0

    def counts(self) -> dict[str, int]:
        counts = {"pass": 0, "warn": 0, "fail": 0}
        for result in self.results:
            counts[result.status] += 1
        return counts

    @property
    def exit_code(self) -> int:
        """0 when everything passed (warnings allowed unless strict), else 1."""
        counts = self.counts()
        return 1 if counts["fail"] or (self.strict and counts["warn"]) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "strict": self.strict,
            "duration_s": round(self.duration_s, 3),
            "counts": self.counts(),
            "checks": [result.to_json() for result in self.results],
        }


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    """What ``validate-components`` was asked to check, and how strictly."""

    only: frozenset[str] = frozenset(GROUPS)
    strict: bool = False
    models: tuple[str, ...] | None = None  # None: the whole catalog
    min_disk_gb: float | None = None  # None: from the selected models' sizes
    min_ram_gb: float | None = None  # None: policy.ram_margin_gb
    trust_new_host_key: bool = False
    config_path: str | None = None
    debug: bool = False  # let unexpected exceptions out instead of failing the check


def parse_list(text: str | None) -> tuple[str, ...] | None:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; None or blank -> None."""
    if text is None:
        return None
    items = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    return items or None


def parse_only(text: str | None) -> frozenset[str]:
    """The groups ``--only`` names; ValueError for an unknown one."""
    names = parse_list(text)
    if names is None:
        return frozenset(GROUPS)
    for name in names:
        if name not in GROUPS:
            raise ValueError(
                f"unknown check {name!r}{did_you_mean(name, GROUPS)}; "
                f"choose from {', '.join(GROUPS)}"
            )
    return frozenset(names)


def ordered(results: Iterable[CheckResult]) -> tuple[CheckResult, ...]:
    """Rows in the documented order (groups, then each group's rows)."""
    rank = {name: i for i, name in enumerate(row for rows in ROWS.values() for row in rows)}
    return tuple(sorted(results, key=lambda r: rank.get(r.name, len(rank))))


def guarded(
    names: Sequence[str], work: Callable[[], list[CheckResult]], *, debug: bool
) -> list[CheckResult]:
    """Run ``work``; any error fails the rows ``names`` instead of stopping the others."""
    started = time.monotonic()
    try:
        return work()
    except DeployError as exc:  # an expected failure: a row even with --debug
        remedy = exc.hint or "see the message; rerun with --debug for details"
        return _timed(not_checked(names, one_line(str(exc)), remedy), started)
    except Exception as exc:
        if debug:
            raise
        message = f"unexpected {type(exc).__name__}: {one_line(str(exc))}"
        return _timed(not_checked(names, message, "rerun with --debug for details"), started)


def _timed(results: list[CheckResult], started: float) -> list[CheckResult]:
    elapsed = time.monotonic() - started
    return [replace(r, duration_s=elapsed) for r in results]


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def gb_text(n: float) -> str:
    """Bytes as ``12.3 GB`` (decimal, as disks and the catalog count)."""
    return f"{n / GB:.1f} GB"
