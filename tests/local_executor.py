"""An ``Executor`` that runs commands on this machine, so host-side logic (lock, audit, file
installs) is tested against a real filesystem without SSH.

Each argv goes through ``deployer.ssh.remote_command`` (the same quoting the SSH executor
uses) and then ``bash -c``. ``sudo -n --`` is dropped unless we are root and sudo exists.
Every call is recorded in ``calls`` (argv, sudo, stdin) for assertions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from deployer.errors import CommandResult, RemoteCommandFailed
from deployer.ssh import OutputCallback, remote_command


@dataclass(frozen=True)
class Call:
    argv: tuple[str, ...]
    sudo: bool
    stdin: str | None
    command: str


@dataclass
class LocalExecutor:
    cwd: str | None = None
    name: str = "local"
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def target(self) -> str:
        return self.name

    def _use_sudo(self, sudo: bool) -> bool:
        return sudo and os.geteuid() == 0 and shutil.which("sudo") is not None

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
        command = remote_command(argv, sudo=self._use_sudo(sudo), env=env)
        with self._lock:
            self.calls.append(Call(tuple(str(a) for a in argv), sudo, stdin, command))
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=self.cwd,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if on_output is None:
            try:
                out, err = proc.communicate(stdin, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                code, err = 124, f"timed out after {timeout}s"
        else:
            out, err, code = self._stream(proc, stdin, on_output, timeout)
        result = CommandResult(command, code, out, err)
        if check and not result.ok:
            raise RemoteCommandFailed(result, what=what)
        return result

    @staticmethod
    def _stream(
        proc: subprocess.Popen[str],
        stdin: str | None,
        on_output: OutputCallback,
        timeout: float | None,
    ) -> tuple[str, str, int]:
        err_parts: list[str] = []

        def feed() -> None:
            if proc.stdin is not None:
                try:
                    proc.stdin.write(stdin or "")
                    proc.stdin.close()
                except BrokenPipeError:
                    pass

        def drain_err() -> None:
            assert proc.stderr is not None
            err_parts.append(proc.stderr.read())

        threads = [threading.Thread(target=feed), threading.Thread(target=drain_err)]
        for t in threads:
            t.start()
        out_lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            out_lines.append(line)
            on_output(line.rstrip("\n"))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = 124
        for t in threads:
            t.join()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
        return "".join(out_lines), "".join(err_parts), code

    def close(self) -> None:
        return None
