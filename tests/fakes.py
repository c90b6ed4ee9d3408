"""Test doubles: a recording, canned-answer ``Executor``, and host-facts builders.

``FakeExecutor`` is the Fabric ``MockContext`` idea for our ``Executor`` protocol: it records
every call (argv, sudo, stdin, env, timeout) and answers from rules added with ``on(...)``,
matched in order by argv prefix or predicate. An answer is a ``CommandResult``, a string
(stdout of a successful command), a callable taking the ``Call``, or an exception to raise.
Unmatched commands fail loudly, so a test states every command it expects.

``probe_json(...)`` builds what ``probe_host.py`` prints for a host; ``g5_facts(...)`` is the
g5.4xlarge of the reference documents: one A10G (23028 MiB), 62 GB RAM, 16 CPUs, Flux holding
about 14 GB of GPU memory and 34 GB of RAM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.errors import CommandResult, RemoteCommandFailed
from deployer.facts import DeploymentState, HostFacts
from deployer.releases import Release
from deployer.ssh import remote_command

GB = 1_000_000_000
MIB = 1024 * 1024
A10G_MIB = 23028
FLUX_PID = 4100
OURS_PID = 5200


@dataclass(frozen=True)
class Call:
    argv: tuple[str, ...]
    sudo: bool = False
    stdin: str | None = None
    env: Mapping[str, str] | None = None
    timeout: float | None = None
    what: str | None = None

    @property
    def command(self) -> str:
        return remote_command(self.argv, sudo=self.sudo, env=self.env)


Answer = CommandResult | str | BaseException | Callable[[Call], CommandResult]


@dataclass
class FakeExecutor:
    target: str = "ubuntu@fake-host:22"
    calls: list[Call] = field(default_factory=list)
    rules: list[tuple[Callable[[Call], bool], Answer]] = field(default_factory=list)
    closed: bool = False

    def on(self, match: Sequence[str] | Callable[[Call], bool], answer: Answer) -> FakeExecutor:
        if callable(match):
            predicate = match
        else:
            prefix = tuple(match)
            predicate = lambda call: call.argv[: len(prefix)] == prefix  # noqa: E731
        self.rules.append((predicate, answer))
        return self

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
        call = Call(tuple(argv), sudo, stdin, dict(env) if env else None, timeout, what)
        self.calls.append(call)
        for predicate, answer in self.rules:
            if predicate(call):
                result = self._answer(call, answer)
                break
        else:
            raise AssertionError(f"FakeExecutor: no canned answer for {call.command[:200]}")
        if on_output is not None:
            for line in result.stdout.splitlines():
                on_output(line)
        if check and not result.ok:
            raise RemoteCommandFailed(result, what=what)
        return result

    @staticmethod
    def _answer(call: Call, answer: Answer) -> CommandResult:
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, CommandResult):
            return answer
        if isinstance(answer, str):
            return CommandResult(call.command, 0, answer, "")
        return answer(call)

    def close(self) -> None:
        self.closed = True


def run_locally(
    env: Mapping[str, str] | None = None, *, python: str | None = None
) -> Callable[[Call], CommandResult]:
    """An answer that runs the command on this machine (the probe script against fake driver
    tools on PATH). ``python`` replaces argv[0] (the host's ``python3``)."""

    def answer(call: Call) -> CommandResult:
        argv = list(call.argv)
        if python:
            argv[0] = python
        proc = subprocess.run(
            argv,
            input=call.stdin,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=call.timeout or 60,
            check=False,
        )
        return CommandResult(call.command, proc.returncode, proc.stdout, proc.stderr)

    return answer


# --------------------------------------------------------------------------- facts


def unit(name: str, *, active: bool, pid: int, ram_bytes: int = 0) -> dict[str, Any]:
    if not active:
        return {
            "name": name,
            "load_state": "loaded",
            "active_state": "inactive",
            "sub_state": "dead",
            "main_pid": 0,
            "memory_current_bytes": None,
            "memory_rss_bytes": None,
            "n_restarts": 0,
            "pids": [],
        }
    return {
        "name": name,
        "load_state": "loaded",
        "active_state": "active",
        "sub_state": "running",
        "main_pid": pid,
        "memory_current_bytes": ram_bytes,
        "memory_rss_bytes": ram_bytes,
        "n_restarts": 0,
        "pids": [pid],
    }


def probe_json(
    *,
    gpus: Sequence[dict[str, Any]] | None = None,
    gpu_total_mib: int = A10G_MIB,
    flux_gpu_mib: int = 14000,
    flux_ram_bytes: int = 34 * GB,
    flux_active: bool = True,
    ours_gpu_mib: int = 0,
    ours_ram_bytes: int = 0,
    ours_active: bool = False,
    other_gpu_mib: int = 0,
    ram_total_bytes: int = 62 * GB,
    ram_available_bytes: int | None = None,
    disk_free_bytes: int = 200 * GB,
    per_process: bool = True,
    deployed: dict[str, Any] | None = None,
    listeners: Sequence[int] | None = None,
    no_gpu: bool = False,
) -> dict[str, Any]:
    """What ``probe_host.py`` prints for such a host (defaults: the g5.4xlarge with Flux)."""
    flux_gpu = flux_gpu_mib if flux_active else 0
    ours_gpu = ours_gpu_mib if ours_active else 0
    if gpus is None:
        used = min(flux_gpu + ours_gpu + other_gpu_mib, gpu_total_mib)
        procs = []
        if flux_gpu:
            procs.append(
                {"pid": FLUX_PID, "name": "python3", "used_mib": flux_gpu, "gpu_uuid": "GPU-0"}
            )
        if ours_gpu:
            procs.append(
                {"pid": OURS_PID, "name": "python", "used_mib": ours_gpu, "gpu_uuid": "GPU-0"}
            )
        if other_gpu_mib:
            procs.append(
                {"pid": 777, "name": "other", "used_mib": other_gpu_mib, "gpu_uuid": "GPU-0"}
            )
        gpus = [
            {
                "index": 0,
                "uuid": "GPU-0",
                "name": "NVIDIA A10G",
                "memory_total_mib": gpu_total_mib,
                "memory_used_mib": used,
                "memory_free_mib": gpu_total_mib - used,
                "processes": procs if per_process else None,
            }
        ]
    if ram_available_bytes is None:
        held = (flux_ram_bytes if flux_active else 0) + (ours_ram_bytes if ours_active else 0)
        ram_available_bytes = max(ram_total_bytes - held - 2 * GB, 0)
    ports = (
        list(listeners)
        if listeners is not None
        else (
            [22]
            + ([8000] if flux_active else [])
            + ([deployed["port"]] if deployed and ours_active else [])
        )
    )
    return {
        "probe_version": 1,
        "hostname": "g5-host",
        "boot_id": "boot-1",
        "collected_at": 1_790_000_000.0,
        "duration_s": 0.05,
        "cpu_count": 16,
        "cpu_usable": 16,
        "memory": {"total_bytes": ram_total_bytes, "available_bytes": ram_available_bytes},
        "disk": {
            "path": "/opt/models",
            "measured_path": "/opt",
            "free_bytes": disk_free_bytes,
            "total_bytes": 500 * GB,
        },
        "gpu": (
            {
                "source": "none",
                "devices": [],
                "error": "no NVIDIA driver tools: nvidia-smi not found",
            }
            if no_gpu
            else {
                "source": "nvidia-smi",
                "driver_version": "535.183.01",
                "cuda_version": "12.2",
                "devices": list(gpus),
                "error": None,
            }
        ),
        "flux": unit(
            "flux-api.service", active=flux_active, pid=FLUX_PID, ram_bytes=flux_ram_bytes
        ),
        "inference": unit(
            "asoba-inference.service", active=ours_active, pid=OURS_PID, ram_bytes=ours_ram_bytes
        ),
        "listeners": [{"address": "0.0.0.0", "port": p} for p in sorted(set(ports))],
        "software": {
            "python": "3.12.10",
            "torch": "2.4.0+cu121",
            "torch_cuda": "12.1",
            "packages": {"torch": "2.4.0+cu121"},
        },
        "deployed": deployed,
        "deployed_error": None,
        "errors": [],
    }


def g5_facts(**kwargs: Any) -> HostFacts:
    return HostFacts.model_validate(probe_json(**kwargs))


def probe_answer(facts_json: Mapping[str, Any]) -> Callable[[Call], CommandResult]:
    def answer(call: Call) -> CommandResult:
        return CommandResult(call.command, 0, json.dumps(facts_json) + "\n", "")

    return answer


def is_probe(call: Call) -> bool:
    return call.argv[1:2] == ("-",) and "probe_host" in (call.stdin or "")


# --------------------------------------------------------------------------- fake tools

FAKE_NVIDIA_SMI = """#!/bin/sh
# Fake nvidia-smi for tests: prints canned CSV per query.
case "$*" in
  *--query-gpu=*) cat "$FAKE_SMI_DIR/gpus.csv"; exit "$(cat "$FAKE_SMI_DIR/gpus.rc")";;
  *--query-compute-apps=*) cat "$FAKE_SMI_DIR/apps.csv"; exit 0;;
  *--version*) echo "NVIDIA-SMI version  : 535.183.01"; echo "CUDA Version        : 12.2"; exit 0;;
esac
echo "unexpected arguments: $*" >&2
exit 2
"""


def install_fake_nvidia_smi(
    bin_dir: Path, gpus_csv: str, apps_csv: str = "", gpus_rc: int = 0
) -> dict[str, str]:
    """Write a fake ``nvidia-smi`` into ``bin_dir``; returns the env that puts it first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(FAKE_NVIDIA_SMI)
    tool.chmod(0o755)
    (bin_dir / "gpus.csv").write_text(gpus_csv)
    (bin_dir / "apps.csv").write_text(apps_csv)
    (bin_dir / "gpus.rc").write_text(str(gpus_rc))
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_SMI_DIR": str(bin_dir),
    }


def block_pynvml(shim_dir: Path) -> dict[str, str]:
    """Env that makes ``import pynvml`` fail (as on a host without nvidia-ml-py)."""
    shim_dir.mkdir(parents=True, exist_ok=True)
    (shim_dir / "pynvml.py").write_text("raise ImportError('pynvml absent (test)')\n")
    return {"PYTHONPATH": str(shim_dir)}


FAKE_PYNVML = '''
"""Fake pynvml for tests: one 24 GB GPU with two processes, or none readable."""
import types

class NVMLError(Exception):
    pass

def nvmlInit():
    pass

def nvmlShutdown():
    pass

def nvmlSystemGetDriverVersion():
    return b"550.54.15"

def nvmlSystemGetCudaDriverVersion_v2():
    return 12040

def nvmlDeviceGetCount():
    return 1

def nvmlDeviceGetHandleByIndex(i):
    return i

def nvmlDeviceGetName(h):
    return "NVIDIA A10G"

def nvmlDeviceGetUUID(h):
    return "GPU-fake-0"

def nvmlDeviceGetMemoryInfo(h):
    mib = 1024 * 1024
    return types.SimpleNamespace(total=23028 * mib, used=14512 * mib, free=8516 * mib)

def nvmlDeviceGetComputeRunningProcesses(h):
    return [types.SimpleNamespace(pid=4242, usedGpuMemory=14000 * 1024 * 1024),
            types.SimpleNamespace(pid=4343, usedGpuMemory=None)]
'''


def fake_pynvml(shim_dir: Path) -> dict[str, str]:
    shim_dir.mkdir(parents=True, exist_ok=True)
    (shim_dir / "pynvml.py").write_text(FAKE_PYNVML)
    return {"PYTHONPATH": str(shim_dir)}


PYTHON = sys.executable


def make_release(
    model: str,
    revision: str = "r1",
    model_path: str | None = None,
    port: int = 8001,
    quantization: str = "none",
    service: str = "asoba-inference.service",
    unit_text: str = "[Service]\nExecStart=/bin/true\n",
    **record: Any,
) -> Release:
    """A ``Release`` as apply records one (the state the probe reads, and the record)."""
    state = DeploymentState(
        model=model, revision=revision, port=port, quantization=quantization, service=service
    )
    path = model_path or f"/opt/models/{model}/{revision}"
    return Release(state=state, model_path=path, unit_text=unit_text, **record)
