"""A deploy is a list of steps, each with ``apply`` and, where it changes the host, ``undo``.

Rollback is the same list walked back: when a step fails, every step that completed is undone
in reverse order. An undo that itself fails is reported, and the walk goes on, so one broken
undo cannot strand the rest of the host half-changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Action = Callable[[], None]
Reporter = Callable[[str, str], None]  # (event, message): start|done|skip|undo|undo-failed


@dataclass
class Step:
    name: str
    description: str
    apply: Action
    undo: Action | None = None
    #: Asked when the step's turn comes; True: nothing to do (reported as ``skip``, no undo).
    skip: Callable[[], bool] | None = None


@dataclass
class StepFailure(Exception):
    """A step failed; ``undone`` and ``undo_errors`` say how the rollback went."""

    step: str
    error: BaseException
    undone: list[str] = field(default_factory=list)
    undo_errors: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"step {self.step!r} failed: {self.error}"


def _quiet(event: str, message: str) -> None:
    return None


def run_steps(steps: Sequence[Step], report: Reporter = _quiet) -> list[str]:
    """Run ``steps`` in order; on failure undo the completed ones and raise ``StepFailure``."""
    done: list[Step] = []
    for step in steps:
        if step.skip is not None and step.skip():
            report("skip", step.name)
            continue
        report("start", step.name)
        try:
            step.apply()
        except BaseException as exc:
            failure = StepFailure(step.name, exc)
            for previous in reversed(done):
                if previous.undo is None:
                    continue
                report("undo", previous.name)
                try:
                    previous.undo()
                except Exception as undo_exc:
                    failure.undo_errors.append((previous.name, str(undo_exc)))
                    report("undo-failed", f"{previous.name}: {undo_exc}")
                else:
                    failure.undone.append(previous.name)
            raise failure from exc
        done.append(step)
        report("done", step.name)
    return [s.name for s in done]
