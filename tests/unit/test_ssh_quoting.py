"""Every remote command line is built by one quoting helper."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.config import HostConfig
from deployer.ssh import SSHHost, remote_command, shell_join


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


def test_operator_fabric_files_cannot_turn_on_agent_forwarding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ~/.fabric.yaml (or /etc/fabric.yaml) is not read: no agent forwarding, no other
    setting of the operator's machine rides into the connection."""
    (tmp_path / ".fabric.yaml").write_text("forward_agent: true\nuser: someone-else\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    host = SSHHost(HostConfig(address="192.0.2.1", user="ubuntu", known_hosts=tmp_path / "kh"))
    conn = host._conn
    assert conn.forward_agent is False
    assert conn.config.forward_agent is False
    assert conn.user == "ubuntu"
    assert "someone-else" not in repr(conn.config)


def test_key_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path) -> None:
    import shutil
    import subprocess

    import paramiko

    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen is not installed")
    key_file = tmp_path / "id_rsa"
    paramiko.RSAKey.generate(2048).write_private_key_file(str(key_file))
    listed = subprocess.run([keygen, "-l", "-f", str(key_file)], capture_output=True, text=True)
    expected = listed.stdout.split()[1]
    host = SSHHost(HostConfig(address="192.0.2.1", key_file=key_file, known_hosts=tmp_path / "kh"))
    assert host.key_fingerprint == expected and expected.startswith("SHA256:")
    agent = SSHHost(HostConfig(address="192.0.2.1", known_hosts=tmp_path / "kh"))
    assert agent.key_fingerprint == "agent"
