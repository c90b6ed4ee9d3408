"""Running commands on the GPU host.

Remote commands are data: callers build argv lists and this module is the one place that
turns them into a shell line (``shlex.join``), so every argument is quoted. The core takes
an ``Executor``; tests hand it a recording fake, integration tests the real sandbox host.

Host keys are always verified against a known_hosts file. An unknown key is refused with its
fingerprint shown; only an explicit ``trust_new_host_key=True`` records a first-seen key, and a
changed key is refused always.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import paramiko
from fabric import Config, Connection
from fabric.runners import Remote
from invoke.exceptions import CommandTimedOut

from .config import HostConfig
from .errors import AuthError, CommandResult, ConnectError, HostKeyError, RemoteCommandFailed

OutputCallback = Callable[[str], None]


def shell_join(argv: Sequence[str]) -> str:
    """The only way a remote command line is made: every word quoted."""
    if not argv:
        raise ValueError("empty command")
    return shlex.join(str(a) for a in argv)


def remote_command(
    argv: Sequence[str], *, sudo: bool = False, env: Mapping[str, str] | None = None
) -> str:
    words: list[str] = []
    if sudo:
        words += ["sudo", "-n", "--"]
    if env:
        words += ["env", *(f"{k}={v}" for k, v in sorted(env.items()))]
    return shell_join([*words, *argv])


class Executor(Protocol):
    """What the core needs from a host: run a command, get its result."""

    @property
    def target(self) -> str: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        what: str | None = None,
    ) -> CommandResult: ...

    def close(self) -> None: ...


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _UnknownHostKey(paramiko.SSHException):  # type: ignore[misc]  # paramiko: untyped
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"unknown host key for {hostname}")
        self.hostname = hostname
        self.key = key


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]  # untyped base
    def __init__(self, known_hosts: Path, trust_new: bool) -> None:
        self.known_hosts = known_hosts
        self.trust_new = trust_new

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        if not self.trust_new:
            raise _UnknownHostKey(hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with self.known_hosts.open("a", encoding="utf-8") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class _LineWriter(io.TextIOBase):
    """A stream that hands complete lines to a callback (for live progress)."""

    def __init__(self, callback: OutputCallback) -> None:
        self._callback = callback
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._callback(line)
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            self._callback(self._buffer)
            self._buffer = ""


STDIN_CHUNK = 64 * 1024


class _ChunkedStdinRemote(Remote):  # type: ignore[misc]  # fabric ships no types
    """Fabric's remote runner, feeding a string stdin in 64 KiB chunks.

    Invoke asks a stream that is not a terminal for one byte per turn of its stdin loop and
    naps 10 ms between turns: about 100 bytes a second, so a 20 KB script took minutes.
    """

    def read_our_stdin(self, input_: io.TextIOBase) -> str | None:
        if isinstance(input_, io.StringIO):
            return input_.read(STDIN_CHUNK)
        return super().read_our_stdin(input_)  # type: ignore[no-any-return]


class SSHHost:
    """An ``Executor`` over one Fabric connection, opened on first use."""

    def __init__(self, host: HostConfig, *, trust_new_host_key: bool = False) -> None:
        if not host.address:
            raise ConnectError("no target host configured")
        self._cfg = host
        self.known_hosts = host.known_hosts or Path.home() / ".ssh" / "known_hosts"
        connect_kwargs: dict[str, object] = {"allow_agent": True, "look_for_keys": False}
        if host.key_file is not None:
            connect_kwargs["key_filename"] = str(host.key_file)
            connect_kwargs["allow_agent"] = False
        # Nothing from the operator's machine changes what we connect to or allow:
        # load_ssh_configs=False ignores ~/.ssh/config, lazy=True loads no Fabric/Invoke config
        # file (/etc/fabric.yaml, ~/.fabric.yaml: `forward_agent: true` there would hand the
        # host the operator's agent), and agent forwarding is off explicitly.
        config = Config(
            lazy=True,
            overrides={
                "load_ssh_configs": False,
                "forward_agent": False,
                "run": {"echo": False},
                "runners": {"remote": _ChunkedStdinRemote},
            },
        )
        self._conn = Connection(
            host.address,
            user=host.user,
            port=host.port,
            config=config,
            connect_timeout=int(host.connect_timeout),
            connect_kwargs=connect_kwargs,
            forward_agent=False,
        )
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_HostKeyPolicy(self.known_hosts, trust_new_host_key))
        self._conn.client = client
        self.connect_seconds: float | None = None

    @property
    def target(self) -> str:
        return f"{self._cfg.user}@{self._cfg.address}:{self._cfg.port}"

    @property
    def key_fingerprint(self) -> str | None:
        """The SHA256 fingerprint of the key file this connection logs in with, as
        ``ssh-keygen -l`` prints it; ``agent`` when the SSH agent offers the key."""
        if self._cfg.key_file is None:
            return "agent"
        try:
            return str(paramiko.PKey.from_path(self._cfg.key_file).fingerprint)
        except (OSError, paramiko.SSHException, ValueError):
            return None

    def open(self) -> None:
        if self._conn.is_connected:
            return
        started = time.monotonic()
        try:
            self._conn.open()
        except _UnknownHostKey as exc:
            raise HostKeyError(
                f"host key of {exc.hostname} is not known ({exc.key.get_name()} "
                f"{fingerprint(exc.key)}); refusing to connect",
                fingerprint=fingerprint(exc.key),
                hint=f"verify the fingerprint, then add it to {self.known_hosts} "
                "(or pass --trust-new-host-key once)",
            ) from None
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(
                f"host key of {exc.hostname} CHANGED: got {fingerprint(exc.key)}, "
                f"expected {fingerprint(exc.expected_key)}; refusing to connect",
                fingerprint=fingerprint(exc.key),
                hint=f"if the host was rebuilt, remove its old line from {self.known_hosts}",
            ) from None
        except paramiko.AuthenticationException as exc:
            raise AuthError(
                f"SSH authentication failed for {self.target}: {exc}",
                hint="check host.key_file and that its public key is authorized on the host",
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ConnectError(f"cannot reach {self.target}: {reason}") from None
        self.connect_seconds = time.monotonic() - started

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        what: str | None = None,
    ) -> CommandResult:
        command = remote_command(argv, sudo=sudo, env=env)
        self.open()
        out = _LineWriter(on_output) if on_output else None
        try:
            raw = self._conn.run(
                command,
                hide=out is None,
                warn=True,
                pty=False,
                in_stream=io.StringIO(stdin) if stdin is not None else False,
                out_stream=out,
                err_stream=io.StringIO() if out is not None else None,
                timeout=timeout,
            )
            if raw.exited == -1:
                # The channel closed without an exit status: the connection went away.
                self.close()
                raise ConnectError(f"connection to {self.target} lost during {what or command}")
            result = CommandResult(command, raw.exited, raw.stdout, raw.stderr)
        except CommandTimedOut as exc:
            stdout = exc.result.stdout if exc.result is not None else ""
            result = CommandResult(command, 124, stdout, f"timed out after {timeout}s")
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.close()
            raise ConnectError(
                f"connection to {self.target} lost during {what or command}: {exc}"
            ) from None
        finally:
            if out is not None:
                out.flush()
        if check and not result.ok:
            raise RemoteCommandFailed(result, what=what)
        return result

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SSHHost:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
