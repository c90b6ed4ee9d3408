"""What the host probe measured: ``HostFacts``, and the deployment state file it reads.

``deployer/remote/probe_host.py`` prints one JSON object whose keys are exactly the fields
below; ``deployer.probe`` validates it into these models (unknown keys are errors, so the
script and the models cannot drift apart silently). Units are the ones the source reports:
GPU memory in MiB as the driver gives it, everything else in bytes.

Deployment state file
---------------------
The apply stage records what it put on the host in ``<settings.remote.state_dir>/current.json``
(``deployer.releases.CURRENT``, whose writer is ``Releases``)
(default ``/var/lib/model-deployer/current.json``), mode 0644 so that the unprivileged probe
can read it. It writes the file atomically (temp file + rename) after the service is healthy,
and removes it when it removes the deployment. Format (``DeploymentState``)::

    {
      "schema": 1,
      "model": "qwen3-14b",                 # catalog name the operator asked for
      "weights_model": "qwen3-14b-awq",     # catalog entry whose weights were pulled
      "revision": null,                     # catalog revision, when set
      "port": 8000,
      "quantization": "awq",                # none | awq | bnb-4bit | bnb-8bit
      "service": "asoba-inference.service",
      "flux_stopped": true,                 # the deploy stopped (and disabled) flux-api.service
      "flux_was_enabled": true,             # ... which was enabled before: undeploy re-enables
      "deployed_at": "2026-11-23T10:42:06Z",
      "plan_id": "3f1c9a0e2b7d4c55",        # Plan.plan_id of the plan that was applied
      "code_id": "9b1e0c4f2a77",            # hash of the service code and its lock (the venv)
      "lock_hash": "51d0a9e3c2b8"           # hash of deployer/locks/server.txt in that venv
    }

Keys other than these are kept (``extra="allow"``) so an older probe reads a newer file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MIB = 1024 * 1024
PROBE_VERSION = 1
STATE_SCHEMA = 1


class _Fact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuProcess(_Fact):
    pid: int
    name: str = ""
    used_mib: int | None = None  # None: the driver does not say
    gpu_uuid: str | None = None


class Gpu(_Fact):
    index: int
    name: str
    uuid: str | None = None
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    #: Compute processes on this GPU; ``None`` when the driver gave no per-process list.
    processes: list[GpuProcess] | None = None

    @property
    def free_bytes(self) -> int:
        return self.memory_free_mib * MIB

    @property
    def total_bytes(self) -> int:
        return self.memory_total_mib * MIB

    def used_by_pids(self, pids: set[int]) -> int | None:
        """Bytes this GPU holds for ``pids``; ``None`` when per-process use is unknown."""
        if self.processes is None:
            return None
        total = 0
        for proc in self.processes:
            if proc.pid in pids:
                if proc.used_mib is None:
                    return None
                total += proc.used_mib
        return total * MIB


class GpuFacts(_Fact):
    source: Literal["nvml", "nvidia-smi", "none"]
    driver_version: str | None = None
    cuda_version: str | None = None  # the driver's CUDA version
    devices: list[Gpu] = []
    error: str | None = None  # why there is no GPU list (a fact, not a failure)


class UnitFacts(_Fact):
    """``systemctl show`` of one unit, plus the processes of its cgroup."""

    name: str
    load_state: str = "unknown"  # loaded | not-found | masked | unknown (no systemctl)
    active_state: str = "unknown"  # active | inactive | failed | activating | ...
    sub_state: str = ""
    main_pid: int = 0
    memory_current_bytes: int | None = None  # cgroup accounting; None when not set
    memory_rss_bytes: int | None = None  # sum of VmRSS of ``pids``
    n_restarts: int | None = None
    pids: list[int] = []

    @property
    def exists(self) -> bool:
        return self.load_state == "loaded"

    @property
    def active(self) -> bool:
        return self.active_state in ("active", "activating", "reloading")

    @property
    def memory_bytes(self) -> int:
        """Host memory the unit holds: cgroup accounting, else the RSS of its processes."""
        if self.memory_current_bytes is not None:
            return self.memory_current_bytes
        return self.memory_rss_bytes or 0

    @property
    def pid_set(self) -> set[int]:
        pids = set(self.pids)
        if self.main_pid > 0:
            pids.add(self.main_pid)
        return pids


class MemoryFacts(_Fact):
    total_bytes: int
    available_bytes: int


class DiskFacts(_Fact):
    path: str  # the models directory asked about
    measured_path: str  # the nearest existing directory (the models dir may not exist yet)
    free_bytes: int
    total_bytes: int


class Listener(_Fact):
    address: str
    port: int


class SoftwareFacts(_Fact):
    python: str
    torch: str | None = None
    torch_cuda: str | None = None  # CUDA the installed torch was built for
    packages: dict[str, str | None] = {}


class DeploymentState(BaseModel):
    """``<state_dir>/current.json``: what the apply stage last deployed (see module doc)."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    schema_version: int = Field(STATE_SCHEMA, alias="schema")
    model: str
    weights_model: str | None = None
    revision: str | None = None
    port: int
    quantization: str = "none"
    service: str | None = None
    flux_stopped: bool = False
    flux_was_enabled: bool | None = None  # before this deployment parked Flux (stop_flux)
    deployed_at: str | None = None
    plan_id: str | None = None
    code_id: str | None = None
    lock_hash: str | None = None

    def to_file(self) -> dict[str, object]:
        """The JSON object apply writes (``schema`` spelled as in the file)."""
        return self.model_dump(by_alias=True)


class HostFacts(_Fact):
    probe_version: int
    hostname: str
    boot_id: str | None = None
    collected_at: float  # host clock, seconds since the epoch
    duration_s: float  # how long the probe took on the host
    cpu_count: int
    cpu_usable: int | None = None  # CPUs this process may run on (affinity)
    memory: MemoryFacts
    disk: DiskFacts | None = None
    gpu: GpuFacts
    flux: UnitFacts
    inference: UnitFacts
    listeners: list[Listener] = []
    software: SoftwareFacts
    deployed: DeploymentState | None = None
    deployed_error: str | None = None  # the state file exists but could not be read
    errors: list[str] = []  # parts of the probe that failed (each says which)

    @property
    def listening_ports(self) -> set[int]:
        return {item.port for item in self.listeners}

    def gpu_by_index(self, index: int) -> Gpu | None:
        for gpu in self.gpu.devices:
            if gpu.index == index:
                return gpu
        return None
