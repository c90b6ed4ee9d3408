"""What a deploy needs on the host before anything of its own: directories and the service's
account, made where missing and never changed where present (they are the operator's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import commands

if TYPE_CHECKING:
    from .ssh import Executor


def ensure_dir(executor: Executor, path: str, *, owner: str, mode: str = "0755") -> bool:
    """Make ``path`` (owned by ``owner``) when it is missing; an existing directory is left as
    it is: its owner and mode are the operator's, not this tool's. Returns whether it made
    it."""
    if executor.run(commands.test_path("-d", path), sudo=True, check=False).ok:
        return False
    executor.run(commands.make_dir(path, owner=owner, mode=mode), sudo=True)
    return True


def ensure_service_user(executor: Executor, user: str) -> bool:
    """Make ``user`` a system account (own group, no home, no login shell) when the host has
    no such user; an existing account is left as it is. Returns whether it made it."""
    if executor.run(["id", "-u", "--", user], check=False).ok:
        return False
    executor.run(
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--", user],
        sudo=True,
        what=f"create the service user {user}",
    )  # fmt: skip
    return True
