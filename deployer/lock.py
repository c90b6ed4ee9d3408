"""One deploy at a time per host: an atomic lock directory in the deployer's state dir.

Taking the lock is one ``rename(2)``: the holder's ``info.json`` is written into a fresh
directory ``<state_dir>/lock.new-<token>``, which is then renamed to ``<state_dir>/lock`` with
``mv -T``. A rename onto a directory that exists and is not empty fails, so exactly one of
several racing operators wins, and a lock is never visible without its holder's details
(the classic ``mkdir lock`` then "write details" leaves a moment when it is).

``info.json`` names the holder: ``user@machine``, the operator's pid, when, the command, and a
random token. Removing a lock (release, break, stale recovery) first renames it aside, then
checks the token of what it moved; anything else moved by mistake is put back, so
``release()`` only ever removes our own lock. Breakers also hold ``lock.breaking`` (a plain
``mkdir`` lock) while they check and remove, so concurrent recoveries of one stale lock cannot
remove the fresh lock one of them just took.

Stale locks: when the holder is this same machine and its pid is gone, the lock is taken over
with a warning. "This same machine" is a per-machine id (a hash of ``/etc/machine-id``, else
of a random id kept in the user's config directory), not the hostname: two laptops both called
``ubuntu`` are two machines. A lock from another machine, or one without a machine id, is
never guessed dead: ``force=True`` (the CLI's ``--force-unlock``) or ``break_lock()`` (``unlock``)
takes it explicitly.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import commands
from .errors import DeployError, LockHeld

if TYPE_CHECKING:
    from .ssh import Executor

LOCK_NAME = "lock"
INFO_NAME = "info.json"
Warn = Callable[[str], None]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def local_machine_id() -> str:
    """This machine's id for lock ownership: a hash (the raw id is not for sharing) of
    systemd's machine id, else of a random id kept in the user's config directory."""
    raw = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw:
            break
    if not raw:
        kept = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        kept = kept / "model-deployer" / "machine-id"
        try:
            raw = kept.read_text().strip()
        except OSError:
            raw = ""
        if not raw:
            raw = uuid.uuid4().hex
            with contextlib.suppress(OSError):
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(raw + "\n")
                kept.chmod(0o600)
    return hashlib.sha256(f"model-deployer:{raw}".encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True


@dataclass(frozen=True)
class LockInfo:
    """Who holds the lock, as written in ``info.json``."""

    user: str
    machine: str
    pid: int
    since: str
    command: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    machine_id: str = ""  # local_machine_id() of the holder; "" in locks of older versions

    @property
    def holder(self) -> str:
        return f"{self.user}@{self.machine}"

    def describe(self) -> str:
        return f"{self.holder} (pid {self.pid}) since {self.since}: {self.command}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LockInfo:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("lock info is not an object")
        return cls(
            user=str(data["user"]),
            machine=str(data["machine"]),
            pid=int(data["pid"]),
            since=str(data["since"]),
            command=str(data.get("command", "")),
            token=str(data["token"]),
            machine_id=str(data.get("machine_id", "")),
        )

    @classmethod
    def mine(cls, command: str) -> LockInfo:
        """The info for this process: ``user@hostname``, our pid, now."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return cls(
            user, socket.gethostname(), os.getpid(), _now(), command, machine_id=local_machine_id()
        )


class HostLock:
    """The deploy lock of one host, through an ``Executor`` (``sudo`` for the state dir)."""

    def __init__(
        self,
        executor: Executor,
        state_dir: str,
        *,
        command: str = "deploy-model",
        info: LockInfo | None = None,
        sudo: bool = True,
        warn: Warn | None = None,
        pid_alive: Callable[[int], bool] = _pid_alive,
        machine_id: str | None = None,
    ) -> None:
        self.executor = executor
        self.state_dir = state_dir.rstrip("/") or "/"
        self.path = f"{self.state_dir}/{LOCK_NAME}"
        self.info = info or LockInfo.mine(command)
        self.sudo = sudo
        self.warn = warn or (lambda message: None)
        self.pid_alive = pid_alive
        self.machine_id = machine_id or local_machine_id()
        self.held = False

    # -- commands --------------------------------------------------------------------------

    def _run(self, argv: list[str], *, check: bool = True, stdin: str | None = None) -> Any:
        return self.executor.run(argv, sudo=self.sudo, check=check, stdin=stdin, what="host lock")

    def _aside(self, purpose: str) -> str:
        return f"{self.state_dir}/{LOCK_NAME}.{purpose}-{uuid.uuid4().hex[:12]}"

    def read(self, path: str | None = None) -> LockInfo | None:
        """The current holder, or None when the lock is free."""
        path = path or self.path
        result = self._run(["cat", "--", f"{path}/{INFO_NAME}"], check=False)
        if result.ok:
            try:
                return LockInfo.from_json(result.stdout)
            except (ValueError, KeyError, TypeError):
                return _unreadable(path)
        if self._run(commands.test_path("-d", path), check=False).ok:
            return _unreadable(path)  # a lock directory without readable details
        return None

    def _try_take(self) -> bool:
        self._run(["mkdir", "-p", "-m", "0755", self.state_dir])
        temp = f"{self.path}.new-{self.info.token[:12]}"
        self._run(["mkdir", "-m", "0755", temp])
        try:
            self._run(["tee", f"{temp}/{INFO_NAME}"], stdin=self.info.to_json())
            won = self._run(commands.move(temp, self.path), check=False).ok
        finally:
            self._run(commands.remove_tree(temp), check=False)
        return won and self._owns(self.path)

    def _owns(self, path: str) -> bool:
        current = self.read(path)
        return current is not None and current.token == self.info.token

    def _remove_if(self, expected_token: str) -> bool:
        """Remove the lock if its token is ``expected_token``: rename it aside, check what was
        moved, then delete it, or put it back when it was not the one we meant."""
        aside = self._aside("remove")
        if not self._run(commands.move(self.path, aside), check=False).ok:
            return False  # nothing there
        moved = self.read(aside)
        if moved is None or moved.token != expected_token:
            if not self._run(commands.move(aside, self.path), check=False).ok:
                self.warn(
                    f"the lock of {moved.describe() if moved else 'another deploy'} was "
                    "moved aside while a new one was taken; both deploys may be running"
                )
            return False
        self._run(commands.remove_tree(aside), check=False)
        return True

    def _break(self, expected: LockInfo) -> bool | None:
        """Remove the lock if it still is ``expected``; None while another breaker works.

        Breakers take a second lock (``lock.breaking``, plain ``mkdir``) first, so two
        operators recovering the same stale lock cannot remove each other's fresh one. A
        breaker lock older than a minute is itself stale (breaking takes a second).
        """
        breaker = f"{self.path}.breaking"
        if not self._run(["mkdir", breaker], check=False).ok:
            old = self._run(["find", breaker, "-maxdepth", "0", "-mmin", "+1"], check=False)
            if not old.stdout.strip():
                return None
            self._run(commands.remove_tree(breaker), check=False)
            if not self._run(["mkdir", breaker], check=False).ok:
                return None
        try:
            current = self.read()
            if current is None or current.token != expected.token:
                return False
            return self._remove_if(expected.token)
        finally:
            self._run(["rmdir", breaker], check=False)

    # -- the API ---------------------------------------------------------------------------

    def acquire(self, *, wait_s: float = 0.0, poll_s: float = 2.0, force: bool = False) -> None:
        """Take the lock, waiting up to ``wait_s``; ``LockHeld`` names the holder otherwise."""
        deadline = time.monotonic() + max(0.0, wait_s)
        free_but_failed = 0
        warned: set[str] = set()
        while True:
            if self._try_take():
                self.held = True
                return
            current = self.read()
            if current is None:
                # Released between our attempt and the read: try again at once, but a lock
                # that stays free and still cannot be taken is a problem of the host.
                free_but_failed += 1
                if free_but_failed >= 3:
                    raise DeployError(f"cannot create the host lock {self.path}")
                continue
            if self._stale(current) or force:
                if current.token not in warned:
                    warned.add(current.token)
                    verb = "breaking" if force else "taking over stale"
                    self.warn(f"{verb} host lock held by {current.describe()}")
                if self._break(current) is None:
                    time.sleep(min(0.1, poll_s))  # another operator is breaking it right now
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockHeld(
                    f"another deploy holds the host lock: {current.describe()}",
                    hint="wait and retry (--lock-wait SECONDS), or, if that deploy is gone, "
                    "break the lock explicitly (--force-unlock)",
                )
            time.sleep(min(poll_s, remaining))

    def _stale(self, current: LockInfo) -> bool:
        return (
            bool(current.machine_id)
            and current.machine_id == self.machine_id
            and current.pid > 0
            and not self.pid_alive(current.pid)
        )

    def release(self) -> bool:
        """Remove the lock if it is ours (checked by token); True when it was."""
        if not self.held:
            return False
        self.held = False
        released = self._remove_if(self.info.token)
        if not released:
            self.warn("the host lock was no longer ours when releasing it (broken by force?)")
        return released

    def __enter__(self) -> HostLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _unreadable(path: str) -> LockInfo:
    return LockInfo("?", "?", 0, "?", f"unreadable lock details in {path}", token="")


def lock_status(executor: Executor, state_dir: str, *, sudo: bool = True) -> LockInfo | None:
    """Who holds the host lock (None: free)."""
    return HostLock(executor, state_dir, sudo=sudo).read()


def break_lock(
    executor: Executor, state_dir: str, *, sudo: bool = True, expected_token: str | None = None
) -> LockInfo | None:
    """Remove the host lock whoever holds it (``expected_token``: only that holder's).

    The explicit operator action for a lock whose holder is gone; returns what was removed.
    """
    lock = HostLock(executor, state_dir, sudo=sudo)
    current = lock.read()
    if current is None:
        return None
    if expected_token is not None and current.token != expected_token:
        raise DeployError(f"the host lock is now held by {current.describe()}; not breaking it")
    outcome = lock._break(current)
    if outcome is None:
        raise DeployError("another operator is breaking the host lock right now")
    if not outcome:
        raise DeployError("the host lock changed while breaking it; check its status again")
    return current
