"""A GPU host in a directory: an ``Executor`` for the unit tier of apply and operations.

File commands (``install``, ``mv``, ``cat``, ``rm``, ``ln``, ``readlink``, ``cp``, ``ls``,
``test``, ``tee``, ``find``, the audit append and the lock) run for real on this machine,
with every absolute path moved under ``root`` and ownership flags dropped, so the deployer's
file handling (atomic writes, the release records, the lock, the audit chain) is the real
thing. What needs a real host is simulated from state kept here: systemd (units' active and
enabled state), the journal, the probe (``tests.fakes.probe_json`` built from that state and
the record on disk), the venv install, the pull (the weights directory is made) and the
health wait (ready when our unit runs and its env file names the model).

Every call is recorded, so a test asserts the exact commands that changed the host.
Faults: ``fail_on(predicate)`` makes matching commands fail (exit 1) from then on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.errors import CommandResult, RemoteCommandFailed
from deployer.host_steps import HEALTH_SCRIPT
from deployer.pull import script_source
from tests.fakes import Call, probe_json
from tests.local_executor import LocalExecutor

OUR_UNIT = "asoba-inference.service"
FLUX_UNIT = "flux-api.service"
LOCAL_COMMANDS = {"install", "mv", "cat", "rm", "ln", "readlink", "cp", "ls", "test", "tee"}
LOCAL_COMMANDS |= {"mkdir", "find", "touch"}


@dataclass
class UnitState:
    active: bool = False
    enabled: bool = False
    loaded: bool = True


@dataclass
class FakeHost:
    root: Path
    units: dict[str, UnitState] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    faults: list[list[Any]] = field(default_factory=list)  # [predicate, times left]
    journal: str = "Dec 01 host asoba-inference[1]: ready"
    #: ``ready`` only when our unit serves this model; None: whatever its env file names.
    serving: str | None = None
    target: str = "ubuntu@fake-host:22"
    users: set[str] = field(default_factory=lambda: {"root", "ubuntu"})

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.local = LocalExecutor()
        self.units.setdefault(FLUX_UNIT, UnitState(active=True, enabled=True))
        self.units.setdefault(OUR_UNIT, UnitState(loaded=False))

    # -- the Executor protocol ---------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: Callable[[str], None] | None = None,
        what: str | None = None,
    ) -> CommandResult:
        call = Call(tuple(str(a) for a in argv), sudo, stdin, env, timeout, what)
        self.calls.append(call)
        if self._fault(call):
            result = CommandResult(" ".join(call.argv), 1, "", "injected fault")
        else:
            result = self._answer(call)
        if on_output is not None:
            for line in result.stdout.splitlines():
                on_output(line)
        if check and not result.ok:
            raise RemoteCommandFailed(result, what=what)
        return result

    def close(self) -> None:
        return None

    # -- what tests look at ------------------------------------------------------------------

    def path(self, remote: str) -> Path:
        return self.root / remote.lstrip("/")

    def read(self, remote: str) -> str | None:
        path = self.path(remote)
        return path.read_text() if path.is_file() else None

    def fail_on(self, predicate: Callable[[Call], bool], times: int = 1) -> None:
        """The next ``times`` commands matching ``predicate`` fail (exit 1)."""
        self.faults.append([predicate, times])

    def _fault(self, call: Call) -> bool:
        for fault in self.faults:
            if fault[1] > 0 and fault[0](call):
                fault[1] -= 1
                return True
        return False

    def is_health_wait(self, call: Call) -> bool:
        return call.stdin == HEALTH_SCRIPT.read_text()

    def changes(self) -> list[tuple[str, ...]]:
        """The commands that change units (systemctl verbs other than reads)."""
        reads = {"show", "is-active", "is-enabled", "daemon-reload"}
        return [c.argv for c in self.calls if c.argv[0] == "systemctl" and c.argv[1] not in reads]

    # -- answers -----------------------------------------------------------------------------

    def _answer(self, call: Call) -> CommandResult:
        argv, stdin = call.argv, call.stdin or ""
        command = " ".join(argv)
        if argv[0] == "systemctl":
            return self._systemctl(argv[1:])
        if argv[0] == "id":
            return CommandResult(command, 0 if argv[-1] in self.users else 1, "", "")
        if argv[0] == "useradd":
            self.users.add(argv[-1])
            return CommandResult(command, 0, "", "")
        if argv[0] == "journalctl":
            return CommandResult(command, 0, self.journal + "\n", "")
        if argv[1:2] == ("-",) and "probe_host" in stdin:
            return CommandResult(command, 0, json.dumps(self.probe()) + "\n", "")
        if argv[1:2] == ("-",) and stdin == HEALTH_SCRIPT.read_text():
            return self._health(int(argv[2]), argv[3])
        if argv[1:2] == ("-",) and stdin == script_source():
            return self._pull(argv)
        if argv[1:3] == ("-m", "venv"):
            self.path(argv[-1]).mkdir(parents=True, exist_ok=True)
            return CommandResult(command, 0, "", "")
        if argv[1:3] == ("-m", "pip") or (argv[1:2] == ("-c",) and argv[2].startswith("import ")):
            return CommandResult(command, 0, "", "")  # the venv: its marker file is what counts
        if argv[:2] == ("sh", "-s"):
            return CommandResult(command, 0, "bootstrapped\n", "")
        if argv[0] in LOCAL_COMMANDS or argv[1:2] == ("-c",):
            return self._local(call)
        raise AssertionError(f"the fake host does not know {command!r}")

    def _local(self, call: Call) -> CommandResult:
        argv = list(call.argv)
        if argv[0] == "install":  # ownership needs root; the mode is what tests check
            argv = _drop_pairs(argv, ("-o", "-g"))
        moved = [self._moved(a) for a in argv]
        result = self.local.run(moved, stdin=call.stdin, check=False)
        root = str(self.root)
        return CommandResult(
            " ".join(call.argv),
            result.exit_code,
            result.stdout.replace(root, ""),
            result.stderr.replace(root, ""),
        )

    def _moved(self, arg: str) -> str:
        if arg.startswith("/") and arg != "/dev/stdin":
            return str(self.path(arg))
        return arg

    def _systemctl(self, args: tuple[str, ...]) -> CommandResult:
        verb, name = args[0], args[-1]
        if verb == "daemon-reload":
            for unit_name, state in self.units.items():
                state.loaded = state.loaded or self._unit_file(unit_name) is not None
            return CommandResult("systemctl", 0, "", "")
        unit = self.units.setdefault(name, UnitState(loaded=False))
        if verb == "show":
            path = f"/etc/systemd/system/{name}" if self._unit_file(name) else ""
            load = (
                "loaded"
                if self._unit_file(name) or (unit.loaded and name != OUR_UNIT)
                else ("not-found")
            )
            return CommandResult("systemctl", 0, f"LoadState={load}\nFragmentPath={path}\n", "")
        if verb == "is-active":
            return CommandResult("systemctl", 0 if unit.active else 3, _active(unit) + "\n", "")
        if verb == "is-enabled":
            text = "enabled" if unit.enabled else "disabled"
            return CommandResult("systemctl", 0 if unit.enabled else 1, text + "\n", "")
        if verb in ("start", "restart"):
            if name == OUR_UNIT and self._unit_file(name) is None:
                return CommandResult("systemctl", 5, "", f"Unit {name} not found.")
            unit.active = True
        elif verb == "stop":
            unit.active = False
        elif verb == "enable":
            unit.enabled = True
        elif verb == "disable":
            unit.enabled = False
        return CommandResult("systemctl", 0, "", "")

    def _unit_file(self, name: str) -> str | None:
        return self.read(f"/etc/systemd/system/{name}")

    def probe(self) -> dict[str, Any]:
        record = self.read("/var/lib/model-deployer/current.json")
        deployed = json.loads(record) if record else None
        ours = self.units[OUR_UNIT].active
        return probe_json(
            flux_active=self.units[FLUX_UNIT].active,
            ours_active=ours,
            ours_gpu_mib=2000,
            deployed=deployed,
        )

    def _health(self, port: int, model: str) -> CommandResult:
        env = self.read("/opt/asoba-inference/service.env") or ""
        found = re.search(r"^ASOBA_MODEL_NAME=(.*)$", env, re.M)
        serving = self.serving or (found.group(1).strip("'\"") if found else None)
        if not self.units[OUR_UNIT].active:
            event = {"event": "failed", "unit_state": "failed", "restarts": 1}
            return CommandResult("health", 1, json.dumps(event) + "\n", "")
        if serving != model:
            event = {"event": "wrong-model", "serving": serving}
            return CommandResult("health", 1, json.dumps(event) + "\n", "")
        status = {"status": "healthy", "model": model, "port": port}
        return CommandResult("health", 0, json.dumps({"event": "ready", "status": status}), "")

    def _pull(self, argv: tuple[str, ...]) -> CommandResult:
        spec = dict(zip(argv[2::2], argv[3::2], strict=False))
        revision = spec.get("--revision", "main")
        target = f"{spec['--models-dir']}/{spec['--name']}/{revision}"
        self.path(target).mkdir(parents=True, exist_ok=True)
        (self.path(target) / "config.json").write_text("{}")
        done = {
            "event": "done",
            "status": "pulled",
            "name": spec.get("--name", "model"),
            "revision": revision,
            "path": target,
            "total": 2,
            "files": 1,
            "fetched_bytes": 2,
            "resumed_bytes": 0,
            "elapsed_s": 0.1,
            "rate_bps": 20,
        }
        return CommandResult("pull", 0, json.dumps(done) + "\n", "")


def _active(unit: UnitState) -> str:
    return "active" if unit.active else "inactive"


def _drop_pairs(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        out.append(arg)
    return out
