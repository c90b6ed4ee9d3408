"""The host lock, against a real filesystem through a local executor."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
from pathlib import Path

import pytest

from deployer.errors import LockHeld
from deployer.lock import HostLock, LockInfo, break_lock, local_machine_id, lock_status
from tests.local_executor import LocalExecutor


def info(machine: str = "laptop", pid: int = 4242, user: str = "alice") -> LockInfo:
    return LockInfo(
        user,
        machine,
        pid,
        "2026-01-02T03:04:05+00:00",
        f"deploy-model m ({machine})",
        machine_id=f"id-{machine}",
    )


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def lock(state: Path, who: LockInfo, **kw: object) -> HostLock:
    return HostLock(LocalExecutor(), str(state), info=who, machine_id="id-this-machine", **kw)  # type: ignore[arg-type]


def test_acquire_writes_the_holder_and_release_removes_it(state: Path) -> None:
    executor = LocalExecutor()
    me = info()
    held = HostLock(executor, str(state), info=me)
    held.acquire()
    details = json.loads((state / "lock" / "info.json").read_text())
    assert details["user"] == "alice" and details["machine"] == "laptop"
    assert details["pid"] == 4242 and details["token"] == me.token
    assert lock_status(executor, str(state)) == me
    assert held.release() is True
    assert not (state / "lock").exists()
    assert lock_status(executor, str(state)) is None
    assert sorted(p.name for p in state.iterdir()) == []  # no temp dirs left
    assert all(call.sudo for call in executor.calls)


def test_held_lock_names_the_holder(state: Path) -> None:
    lock(state, info("ops-box", 77, "bob")).acquire()
    with pytest.raises(LockHeld) as exc:
        lock(state, info()).acquire(wait_s=0)
    message = str(exc.value)
    assert "bob@ops-box" in message and "2026-01-02T03:04:05+00:00" in message
    assert "pid 77" in message and exc.value.exit_code == 5
    assert exc.value.hint and "--lock-wait" in exc.value.hint


def test_waits_for_the_holder_until_the_deadline(state: Path) -> None:
    first = lock(state, info("a"))
    first.acquire()
    timer = threading.Timer(0.3, first.release)
    timer.start()
    second = lock(state, info("b"))
    second.acquire(wait_s=5, poll_s=0.05)
    timer.join()
    assert lock_status(LocalExecutor(), str(state)) == second.info

    with pytest.raises(LockHeld):
        lock(state, info("c")).acquire(wait_s=0.2, poll_s=0.05)


def test_concurrent_acquirers_exactly_one_wins(state: Path) -> None:
    contenders = [lock(state, info(f"m{i}")) for i in range(8)]
    barrier = threading.Barrier(len(contenders))
    outcome: dict[int, str] = {}

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            contenders[i].acquire(wait_s=0)
            outcome[i] = "won"
        except LockHeld:
            outcome[i] = "held"

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, result in outcome.items() if result == "won"]
    assert len(outcome) == 8 and len(winners) == 1
    assert lock_status(LocalExecutor(), str(state)) == contenders[winners[0]].info
    assert [p.name for p in state.iterdir()] == ["lock"]


def test_stale_lock_from_a_dead_pid_on_this_machine_is_taken_over(state: Path) -> None:
    lock(state, info("this-machine", dead_pid())).acquire()
    warnings: list[str] = []
    mine = lock(state, info("this-machine", 1), warn=warnings.append)
    mine.acquire(wait_s=0)
    assert lock_status(LocalExecutor(), str(state)) == mine.info
    assert warnings and "stale" in warnings[0]


def test_concurrent_recoveries_of_one_stale_lock_leave_one_holder(state: Path) -> None:
    lock(state, info("this-machine", dead_pid())).acquire()
    contenders = [lock(state, info("this-machine", 1, f"u{i}")) for i in range(6)]
    barrier = threading.Barrier(len(contenders))
    won: list[int] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            contenders[i].acquire(wait_s=0)
            won.append(i)
        except LockHeld:
            pass

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert lock_status(LocalExecutor(), str(state)) == contenders[won[0]].info
    assert [p.name for p in state.iterdir()] == ["lock"]


def test_a_crashed_breaker_does_not_block_recovery_forever(state: Path) -> None:
    import os

    lock(state, info("this-machine", dead_pid())).acquire()
    breaker = state / "lock.breaking"
    breaker.mkdir()
    os.utime(breaker, (0, 0))  # left behind long ago
    mine = lock(state, info("this-machine", 1))
    mine.acquire(wait_s=0)
    assert lock_status(LocalExecutor(), str(state)) == mine.info
    assert not breaker.exists()


def test_live_or_foreign_holders_are_not_guessed_dead(state: Path) -> None:
    lock(state, info("this-machine", 1)).acquire()  # pid 1 is alive
    with pytest.raises(LockHeld):
        lock(state, info("this-machine", 2)).acquire(wait_s=0)
    other = state.parent / "other"
    lock(other, info("elsewhere", dead_pid())).acquire()  # dead pid, but another machine
    with pytest.raises(LockHeld):
        lock(other, info("this-machine", 2)).acquire(wait_s=0)
    warnings: list[str] = []
    forced = lock(other, info("this-machine", 2), warn=warnings.append)
    forced.acquire(force=True)
    assert lock_status(LocalExecutor(), str(other)) == forced.info
    assert "breaking" in warnings[0] and "elsewhere" in warnings[0]


def test_release_only_removes_our_own_lock(state: Path) -> None:
    first = lock(state, info("a"))
    first.acquire()
    second = lock(state, info("b"))
    second.acquire(force=True)  # someone broke our lock and took it
    warnings: list[str] = []
    first.warn = warnings.append
    assert first.release() is False
    assert lock_status(LocalExecutor(), str(state)) == second.info
    assert warnings
    assert second.release() is True and lock_status(LocalExecutor(), str(state)) is None
    assert lock(state, info("c")).release() is False  # never acquired: nothing to do


def test_break_lock_and_unreadable_details(state: Path) -> None:
    executor = LocalExecutor()
    holder = info("gone-box")
    lock(state, holder).acquire()
    assert break_lock(executor, str(state)) == holder
    assert break_lock(executor, str(state)) is None

    (state / "lock").mkdir()
    (state / "lock" / "info.json").write_text("garbage")
    with pytest.raises(LockHeld, match="unreadable"):
        lock(state, info()).acquire(wait_s=0)
    lock(state, info()).acquire(force=True)


def test_context_manager(state: Path) -> None:
    with lock(state, info()) as held:
        assert held.held and (state / "lock").is_dir()
    assert not (state / "lock").exists()


def test_same_hostname_on_another_machine_is_not_stale(state: Path) -> None:
    """Two laptops both called `ubuntu`: the other one's lock is never taken over, even when
    its pid does not exist here."""
    theirs = LockInfo("bob", "ubuntu", dead_pid(), "2026-01-02T03:04:05+00:00", "x")
    theirs = dataclasses.replace(theirs, machine_id="id-their-laptop")
    HostLock(LocalExecutor(), str(state), info=theirs, machine_id="id-their-laptop").acquire()  # type: ignore[arg-type]
    mine = dataclasses.replace(theirs, user="alice", pid=1, token="mine", machine_id="id-mine")
    with pytest.raises(LockHeld):
        HostLock(LocalExecutor(), str(state), info=mine, machine_id="id-mine").acquire(wait_s=0)  # type: ignore[arg-type]


def test_a_lock_without_a_machine_id_is_never_guessed_dead(state: Path) -> None:
    old = LockInfo("bob", "ubuntu", dead_pid(), "2026-01-02T03:04:05+00:00", "x")
    assert old.machine_id == ""
    HostLock(LocalExecutor(), str(state), info=old, machine_id="id-any").acquire()  # type: ignore[arg-type]
    with pytest.raises(LockHeld):
        lock(state, info("ubuntu", 1)).acquire(wait_s=0)


def test_local_machine_id_is_stable_and_not_the_raw_id() -> None:
    first, second = local_machine_id(), local_machine_id()
    assert first == second and len(first) == 16
    raw = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
    assert raw[:16] != first
