from __future__ import annotations

import pytest

from deployer.steps import Step, StepFailure, run_steps


def recording_steps(log: list[str], fail_at: str | None = None, bad_undo: str | None = None):
    def make(name: str) -> Step:
        def apply() -> None:
            if name == fail_at:
                raise RuntimeError(f"{name} broke")
            log.append(f"apply {name}")

        def undo() -> None:
            if name == bad_undo:
                raise RuntimeError(f"cannot undo {name}")
            log.append(f"undo {name}")

        return Step(name, name, apply, undo)

    return [make(n) for n in ("a", "b", "c", "d")]


def test_all_steps_run_in_order() -> None:
    log: list[str] = []
    assert run_steps(recording_steps(log)) == ["a", "b", "c", "d"]
    assert log == ["apply a", "apply b", "apply c", "apply d"]


def test_failure_undoes_completed_steps_in_reverse() -> None:
    log: list[str] = []
    with pytest.raises(StepFailure) as info:
        run_steps(recording_steps(log, fail_at="c"))
    assert log == ["apply a", "apply b", "undo b", "undo a"]
    assert info.value.step == "c"
    assert info.value.undone == ["b", "a"]
    assert "c broke" in str(info.value)


def test_a_failing_undo_does_not_stop_the_rest() -> None:
    log: list[str] = []
    with pytest.raises(StepFailure) as info:
        run_steps(recording_steps(log, fail_at="d", bad_undo="b"))
    assert log == ["apply a", "apply b", "apply c", "undo c", "undo a"]
    assert info.value.undo_errors == [("b", "cannot undo b")]


def test_keyboard_interrupt_also_rolls_back() -> None:
    log: list[str] = []
    steps = recording_steps(log)

    def interrupted() -> None:
        raise KeyboardInterrupt

    steps[2].apply = interrupted
    with pytest.raises(StepFailure):
        run_steps(steps)
    assert log == ["apply a", "apply b", "undo b", "undo a"]
