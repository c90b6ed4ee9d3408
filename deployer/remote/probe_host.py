"""Measure the GPU host in one go and print one JSON object (``deployer.facts.HostFacts``).

Stdlib only, Python 3.8+: it runs with the host's stock ``python3``. model-deployer sends this
file on stdin to one remote command::

    python3 - --models-dir /opt/models --state-file /var/lib/model-deployer/current.json \
        --flux-unit flux-api.service --inference-unit asoba-inference.service

It reads /proc and /sys directly where it can, and starts its few commands (systemctl, the
GPU queries, ss when /proc/net is unreadable) all at once, each with a timeout, so the probe
costs about as long as its slowest command. Every part that fails is reported in ``errors``
and the rest still comes back: no GPU, no systemd or no state file are facts, not crashes.
GPUs come from NVML (``pynvml``) when it imports and initialises, else from ``nvidia-smi``.

The JSON shapes are spelled out as ``TypedDict`` classes for the type checker; annotations stay
unevaluated (``from __future__ import annotations``), so the script still runs on 3.8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, TypedDict, TypeVar

if TYPE_CHECKING:  # annotations only: never evaluated at run time
    from collections.abc import Callable, Sequence

    #: (exit code or None when it could not run, stdout, last line of stderr or why not)
    CommandResult = tuple[int | None, str, str]

T = TypeVar("T")

PROBE_VERSION = 1
MIB = 1024 * 1024
STATE_FILE_MAX = 64 * 1024
UNIT_PROPERTIES = "Id,LoadState,ActiveState,SubState,MainPID,MemoryCurrent,NRestarts,ControlGroup"
GPU_QUERY = "index,uuid,name,memory.total,memory.used,memory.free,driver_version"
APPS_QUERY = "pid,process_name,used_memory,gpu_uuid"
CSV = "--format=csv,noheader,nounits"
PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "autoawq", "nvidia-ml-py")
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")
NOT_SET = 2**64 - 1  # systemd's "infinity" / unset value for MemoryCurrent


class Memory(TypedDict):
    total_bytes: int
    available_bytes: int


class Disk(TypedDict):
    path: str
    measured_path: str
    free_bytes: int
    total_bytes: int


class GpuProcess(TypedDict):
    pid: int
    name: str
    used_mib: int | None
    gpu_uuid: str | None


class Gpu(TypedDict):
    index: int
    uuid: str | None
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    processes: list[GpuProcess] | None


class SmiGpu(Gpu, total=False):
    """A GPU as parsed from nvidia-smi, carrying the driver version until it is lifted out."""

    _driver: str


class _GpuFactsRequired(TypedDict):
    source: str
    devices: Sequence[Gpu]
    error: str | None


class GpuFacts(_GpuFactsRequired, total=False):
    # absent only from the stand-in for a GPU query that raised
    driver_version: str | None
    cuda_version: str | None


class _UnitName(TypedDict):
    name: str


class Unit(_UnitName, total=False):
    """A systemd unit; only ``name`` when systemctl could not be asked."""

    load_state: str
    active_state: str
    sub_state: str
    main_pid: int
    memory_current_bytes: int | None
    n_restarts: int | None
    _cgroup: str  # parse_systemctl_show's, consumed by units()
    pids: list[int]
    memory_rss_bytes: int | None


class Listener(TypedDict):
    address: str
    port: int


class _SoftwareRequired(TypedDict):
    python: str


class Software(_SoftwareRequired, total=False):
    torch: str | None
    torch_cuda: str | None
    packages: dict[str, str | None]


class Facts(TypedDict):
    """Everything the probe prints (``deployer.facts.HostFacts``)."""

    probe_version: int
    hostname: str
    boot_id: str | None
    collected_at: float
    cpu_count: int
    cpu_usable: int | None
    memory: Memory | None
    disk: Disk | None
    listeners: list[Listener]
    software: Software
    deployed: dict[str, object] | None
    deployed_error: str | None
    gpu: GpuFacts
    flux: Unit
    inference: Unit
    errors: list[str]
    duration_s: float


class Fatal(TypedDict):
    fatal: str


class Commands:
    """Subprocesses started together and collected with one shared deadline."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.results: dict[str, CommandResult] = {}

    def start(self, name: str, argv: list[str]) -> None:
        env = dict(os.environ, LC_ALL="C", LANG="C")
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                universal_newlines=True,
                env=env,
            )
        except FileNotFoundError:
            self.results[name] = (None, "", argv[0] + ": not found")
        except OSError as exc:
            self.results[name] = (None, "", f"{argv[0]}: {exc}")

    def result(self, name: str) -> CommandResult:
        """(exit code or None, stdout, error text) of a started command."""
        if name in self.results:
            return self.results[name]
        proc = self.procs.pop(name)
        try:
            out, err = proc.communicate(timeout=max(self.deadline - time.monotonic(), 0.1))
            self.results[name] = (proc.returncode, out, last_line(err))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.results[name] = (None, "", f"timed out after {self.timeout:.0f}s")
        return self.results[name]


def last_line(text: str | None, limit: int = 300) -> str:
    """The last non-empty line of a command's output: its error, without a traceback."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def read_text(path: str, limit: int = 1024 * 1024) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read(limit)


def meminfo() -> Memory:
    values: dict[str, int] = {}
    for line in read_text("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    total = values["MemTotal"]
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return {"total_bytes": total, "available_bytes": available}


def disk(models_dir: str) -> Disk:
    path = os.path.abspath(models_dir)
    while not os.path.isdir(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return {
        "path": models_dir,
        "measured_path": path,
        "free_bytes": st.f_bavail * st.f_frsize,
        "total_bytes": st.f_blocks * st.f_frsize,
    }


def _int(text: str | None) -> int | None:
    """An integer from a driver field, or None for [N/A], [Not Supported] and the like."""
    text = (text or "").strip()
    return int(text) if re.match(r"^\d+$", text) else None


def _decode(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_gpu_csv(text: str) -> list[SmiGpu]:
    """``nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`` -> GPU dicts."""
    gpus: list[SmiGpu] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 7:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        # A GPU name may itself contain a comma: the numeric fields are the last four.
        index, uuid = cells[0], cells[1]
        name = ", ".join(cells[2:-4])
        total, used, free, driver = cells[-4], cells[-3], cells[-2], cells[-1]
        total_mib = _int(total)
        index_number = _int(index)
        if index_number is None or total_mib is None:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        used_mib = _int(used) or 0
        free_mib = _int(free)
        gpus.append(
            {
                "index": index_number,
                "uuid": uuid or None,
                "name": name,
                "memory_total_mib": total_mib,
                "memory_used_mib": used_mib,
                "memory_free_mib": free_mib
                if free_mib is not None
                else max(total_mib - used_mib, 0),
                "processes": None,
                "_driver": driver,
            }
        )
    return gpus


def parse_apps_csv(text: str) -> list[GpuProcess]:
    """``nvidia-smi --query-compute-apps=APPS_QUERY ...`` -> process dicts."""
    apps: list[GpuProcess] = []
    for line in text.splitlines():
        if not line.strip() or "No running processes" in line:
            continue
        cells = [c.strip() for c in line.split(",")]
        pid = _int(cells[0]) if len(cells) >= 4 else None
        if pid is None:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        apps.append(
            {
                "pid": pid,
                "name": ", ".join(cells[1:-2]),
                "used_mib": _int(cells[-2]),
                "gpu_uuid": cells[-1] or None,
            }
        )
    return apps


def parse_cuda_version(text: str | None) -> str | None:
    match = re.search(r"CUDA Version\s*:?\s*([0-9]+\.[0-9]+)", text or "")
    return match.group(1) if match else None


def _process_name(pid: int) -> str:
    try:
        return read_text(f"/proc/{pid}/comm").strip()
    except OSError:
        return ""


def gpus_from_nvml() -> tuple[GpuFacts | None, str | None]:
    """(gpu facts dict, None) from NVML, or (None, why not)."""
    try:
        import pynvml  # optional: only when the host has it (untyped: its values are checked)
    except Exception as exc:  # ImportError, or a broken install
        return None, f"pynvml not importable ({type(exc).__name__})"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return None, f"NVML did not initialise: {exc}"
    try:
        driver = _decode(pynvml.nvmlSystemGetDriverVersion())
        cuda: str | None = None
        getter = getattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", None) or getattr(
            pynvml, "nvmlSystemGetCudaDriverVersion", None
        )
        if getter is not None:
            try:
                version = int(getter())
                cuda = f"{version // 1000}.{(version % 1000) // 10}"
            except Exception:
                cuda = None
        devices: list[Gpu] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = _decode(pynvml.nvmlDeviceGetUUID(handle))
            procs: list[GpuProcess] | None
            try:
                procs = []
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = getattr(proc, "usedGpuMemory", None)
                    procs.append(
                        {
                            "pid": int(proc.pid),
                            "name": _process_name(int(proc.pid)),
                            "used_mib": int(used) // MIB if isinstance(used, int) else None,
                            "gpu_uuid": uuid,
                        }
                    )
            except Exception:
                procs = None
            devices.append(
                {
                    "index": index,
                    "uuid": uuid,
                    "name": _decode(pynvml.nvmlDeviceGetName(handle)),
                    "memory_total_mib": int(mem.total) // MIB,
                    "memory_used_mib": int(mem.used) // MIB,
                    "memory_free_mib": int(mem.free) // MIB,
                    "processes": procs,
                }
            )
        return {
            "source": "nvml",
            "driver_version": driver,
            "cuda_version": cuda,
            "devices": devices,
            "error": None,
        }, None
    except Exception as exc:
        return None, f"NVML query failed: {exc}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def start_nvidia_smi(cmds: Commands) -> None:
    cmds.start("gpus", ["nvidia-smi", "--query-gpu=" + GPU_QUERY, CSV])
    cmds.start("apps", ["nvidia-smi", "--query-compute-apps=" + APPS_QUERY, CSV])
    cmds.start("smi-version", ["nvidia-smi", "--version"])


def gpus_from_nvidia_smi(cmds: Commands, nvml_error: str | None) -> GpuFacts:
    code, out, err = cmds.result("gpus")
    none: GpuFacts = {
        "source": "none",
        "driver_version": None,
        "cuda_version": None,
        "devices": [],
        "error": None,
    }
    if code is None and err.endswith("not found"):
        return {**none, "error": "no NVIDIA driver tools: nvidia-smi not found"}
    if code != 0:
        detail = err or last_line(out) or f"exit {code}"
        return {**none, "error": f"nvidia-smi failed: {detail}"}
    gpus = parse_gpu_csv(out)
    driver = gpus[0].pop("_driver") if gpus else None
    for gpu in gpus:
        gpu.pop("_driver", None)
    code, out, err = cmds.result("apps")
    if code == 0:
        apps = parse_apps_csv(out)
        for gpu in gpus:
            gpu["processes"] = [
                a for a in apps if a["gpu_uuid"] in (None, gpu["uuid"]) or len(gpus) == 1
            ]
    code, out, _ = cmds.result("smi-version")
    cuda = parse_cuda_version(out) if code == 0 else None
    return {
        "source": "nvidia-smi",
        "driver_version": driver,
        "cuda_version": cuda,
        "devices": gpus,
        "error": None if gpus else "nvidia-smi lists no GPU",
    }


def parse_systemctl_show(text: str, names: Sequence[str]) -> dict[str, Unit]:
    """``systemctl show -p ... UNIT...`` blocks, in argument order, keyed by unit name."""
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    units: dict[str, Unit] = {}
    for name, block in zip(names, blocks):  # noqa: B905 (3.8-compatible; lengths checked)
        props: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value.strip()
        memory = _int(props.get("MemoryCurrent"))
        units[name] = {
            "name": name,
            "load_state": props.get("LoadState", "unknown"),
            "active_state": props.get("ActiveState", "unknown"),
            "sub_state": props.get("SubState", ""),
            "main_pid": _int(props.get("MainPID")) or 0,
            "memory_current_bytes": None if memory in (None, NOT_SET) else memory,
            "n_restarts": _int(props.get("NRestarts")),
            "_cgroup": props.get("ControlGroup", ""),
        }
    return units


def cgroup_pids(cgroup: str) -> list[int]:
    if not cgroup:
        return []
    for root in CGROUP_ROOTS:
        path = root + cgroup + "/cgroup.procs"
        try:
            text = read_text(path)
        except OSError:
            continue
        return sorted({int(p) for p in text.split() if p.isdigit()})
    return []


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in read_text(f"/proc/{pid}/status").splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def units(cmds: Commands, names: list[str], errors: list[str]) -> dict[str, Unit]:
    code, out, err = cmds.result("units")
    if code != 0:
        errors.append("systemctl show: " + (err or f"exit {code}"))
        return {n: {"name": n} for n in names}
    found = parse_systemctl_show(out, names)
    result: dict[str, Unit] = {}
    for name in names:
        unit = found.get(name, {"name": name})
        cgroup = unit.pop("_cgroup", "")
        pids = cgroup_pids(cgroup)
        main_pid = unit.get("main_pid")
        if not pids and main_pid:
            pids = [main_pid]
        unit["pids"] = pids
        unit["memory_rss_bytes"] = rss_bytes(pids) if pids else None
        result[name] = unit
    return result


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def parse_proc_net_tcp(text: str) -> list[Listener]:
    listeners: list[Listener] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN
            continue
        address, _, port = fields[1].partition(":")
        listeners.append({"address": _hex_ip(address), "port": int(port, 16)})
    return listeners


def parse_ss(text: str) -> list[Listener]:
    """``ss -ltnH``: State Recv-Q Send-Q Local:Port Peer:Port."""
    listeners: list[Listener] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        if port.isdigit():
            listeners.append({"address": address.strip("[]").split("%")[0], "port": int(port)})
    return listeners


def listeners(errors: list[str]) -> list[Listener]:
    found: list[Listener] = []
    try:
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            if os.path.exists(path):
                found += parse_proc_net_tcp(read_text(path, limit=16 * 1024 * 1024))
    except (OSError, ValueError) as exc:
        try:
            out = subprocess.run(
                ["ss", "-ltnH"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            found = parse_ss(out)
        except (OSError, subprocess.SubprocessError) as exc2:
            errors.append(f"listening ports: /proc/net: {exc}; ss: {exc2}")
            return []
    unique = {(item["address"], item["port"]): item for item in found}
    return [unique[key] for key in sorted(unique)]


def _package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None (also before Python 3.8)."""
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:  # ImportError, PackageNotFoundError, or broken metadata
        return None


def software() -> Software:
    packages = {name: _package_version(name) for name in PACKAGES}
    return {
        "python": platform.python_version(),
        "torch": packages.get("torch"),
        "torch_cuda": torch_cuda() if packages.get("torch") else None,
        "packages": packages,
    }


def torch_cuda() -> str | None:
    """The CUDA version torch was built for, read from torch/version.py without importing torch
    (importing it takes seconds and initialises CUDA)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        text = read_text(os.path.join(next(iter(spec.submodule_search_locations)), "version.py"))
    except (OSError, ImportError, ValueError):
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return match.group(1) if match else None


def deployed(path: str) -> tuple[dict[str, object] | None, str | None]:
    try:
        text = read_text(path, limit=STATE_FILE_MAX + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    if len(text) > STATE_FILE_MAX:
        return None, f"{path} is larger than {STATE_FILE_MAX} bytes"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"{path} is not JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"{path} is not a JSON object"
    return data, None


def _part(errors: list[str], what: str, func: Callable[[], T]) -> T | None:
    """What ``func`` returns, or None with the failure recorded in ``errors``."""
    try:
        return func()
    except Exception as exc:
        errors.append(f"{what}: {type(exc).__name__}: {exc}")
        return None


def probe(args: argparse.Namespace) -> Facts:
    started = time.monotonic()
    errors: list[str] = []
    models_dir: str = args.models_dir
    flux_unit: str = args.flux_unit
    inference_unit: str = args.inference_unit
    cmds = Commands(args.timeout)
    names = [flux_unit, inference_unit]
    cmds.start("units", ["systemctl", "show", "--property=" + UNIT_PROPERTIES, "--", *names])
    gpu, nvml_error = (None, "NVML skipped") if args.no_nvml else gpus_from_nvml()
    if gpu is None:
        start_nvidia_smi(cmds)

    # Measured in this order: each part's failure lands in ``errors`` in the same order.
    hostname = socket.gethostname()
    boot_id = _part(errors, "boot id", lambda: read_text("/proc/sys/kernel/random/boot_id").strip())
    collected_at = round(time.time(), 3)
    cpu_count = os.cpu_count() or 1
    cpu_usable = _part(errors, "cpu affinity", lambda: len(os.sched_getaffinity(0)))
    memory = _part(errors, "memory", meminfo)
    disk_facts = _part(errors, "disk", lambda: disk(models_dir))
    ports = listeners(errors)
    software_facts: Software = _part(errors, "software", software) or {
        "python": platform.python_version()
    }
    state, state_error = deployed(args.state_file)
    if gpu is None:
        gpu = _part(errors, "gpu", lambda: gpus_from_nvidia_smi(cmds, nvml_error)) or {
            "source": "none",
            "devices": [],
            "error": "GPU query failed (see errors)",
        }
    found = _part(errors, "units", lambda: units(cmds, names, errors)) or {}
    return {
        "probe_version": PROBE_VERSION,
        "hostname": hostname,
        "boot_id": boot_id,
        "collected_at": collected_at,
        "cpu_count": cpu_count,
        "cpu_usable": cpu_usable,
        "memory": memory,
        "disk": disk_facts,
        "listeners": ports,
        "software": software_facts,
        "deployed": state,
        "deployed_error": state_error,
        "gpu": gpu,
        "flux": found.get(flux_unit, {"name": flux_unit}),
        "inference": found.get(inference_unit, {"name": inference_unit}),
        "errors": errors,
        "duration_s": round(time.monotonic() - started, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe_host", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--state-file", required=True, help="the deployer's current record")
    parser.add_argument("--flux-unit", required=True)
    parser.add_argument("--inference-unit", required=True)
    parser.add_argument("--timeout", type=float, default=10.0, help="per command, seconds")
    parser.add_argument("--no-nvml", action="store_true", help="skip NVML, use nvidia-smi")
    args = parser.parse_args(argv)
    facts: Facts | Fatal
    try:
        facts = probe(args)
    except Exception as exc:  # never a traceback: the caller reads JSON
        facts = {"fatal": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(facts, sort_keys=True) + "\n")
    return 0 if "fatal" not in facts else 1


if __name__ == "__main__":
    sys.exit(main())
