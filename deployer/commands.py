"""Remote commands as data.

Each function returns an argv list; nothing here runs anything. The apply steps and the
operations hand these to an ``Executor``, which quotes them (``ssh.shell_join``) and runs them.
Unit tests compare the exact lists.
"""

from __future__ import annotations

Argv = list[str]


def systemctl(*args: str) -> Argv:
    return ["systemctl", *args]


def start(unit: str) -> Argv:
    return systemctl("start", unit)


def stop(unit: str) -> Argv:
    return systemctl("stop", unit)


def restart(unit: str) -> Argv:
    return systemctl("restart", unit)


def enable(unit: str) -> Argv:
    return systemctl("enable", unit)


def disable(unit: str) -> Argv:
    return systemctl("disable", unit)


def reset_failed(unit: str) -> Argv:
    return systemctl("reset-failed", unit)


def daemon_reload() -> Argv:
    return systemctl("daemon-reload")


def journal(unit: str, lines: int = 50, *, follow: bool = False) -> Argv:
    argv = ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-iso"]
    return [*argv, "-f"] if follow else argv


def install_from_stdin(path: str, *, mode: str, owner: str, group: str | None = None) -> Argv:
    """Write stdin to ``path`` with the given mode and owner (content never in argv)."""
    return ["install", "-m", mode, "-o", owner, "-g", group or owner, "/dev/stdin", path]


def make_dir(path: str, *, owner: str, mode: str = "0755", group: str | None = None) -> Argv:
    return ["install", "-d", "-m", mode, "-o", owner, "-g", group or owner, path]


def move(source: str, dest: str) -> Argv:
    return ["mv", "-f", "-T", source, dest]


def copy(source: str, dest: str) -> Argv:
    return ["cp", "-a", "-T", source, dest]


def remove(*paths: str) -> Argv:
    return ["rm", "-f", "--", *paths]


def remove_tree(path: str) -> Argv:
    return ["rm", "-rf", "--one-file-system", "--", path]


def symlink(target: str, link: str) -> Argv:
    """Point ``link`` at ``target``; the caller makes it atomic by linking a temp name then
    ``move``-ing it over the old link (``mv -T`` renames over a symlink atomically)."""
    return ["ln", "-sfn", target, link]


def test_path(flag: str, path: str) -> Argv:
    return ["test", flag, path]
