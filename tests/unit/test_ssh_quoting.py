"""Every remote command line is built by one quoting helper."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.ssh import remote_command, shell_join


@given(st.lists(st.text(min_size=0, max_size=20), min_size=1, max_size=6))
def test_shell_join_round_trips_any_argument(argv: list[str]) -> None:
    argv = [a.replace("\x00", "") for a in argv]
    assert shlex.split(shell_join(argv)) == argv


def test_injection_attempts_stay_single_arguments() -> None:
    hostile = ["a;reboot", "$(id)", "`id`", "two words", "../../etc/passwd", "'\""]
    line = remote_command(["ls", *hostile], sudo=True)
    assert line.startswith("sudo -n -- ls ")
    assert shlex.split(line) == ["sudo", "-n", "--", "ls", *hostile]


def test_env_is_passed_through_env_and_quoted() -> None:
    line = remote_command(["true"], env={"B": "x y", "A": "$HOME"})
    assert shlex.split(line) == ["env", "A=$HOME", "B=x y", "true"]


def test_empty_command_is_refused() -> None:
    with pytest.raises(ValueError, match="empty command"):
        shell_join([])
