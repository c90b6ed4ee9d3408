#!/usr/bin/python3
"""nvidia-smi TEST DOUBLE for the model-deployer sandbox host. Not NVIDIA software.

The sandbox installs this file as /usr/local/bin/nvidia-smi inside its container, which has no
GPU. It answers like one NVIDIA A10G (24 GB, 23028 MiB usable) on driver 535.183.01 / CUDA 12.2,
so the deployer's GPU probe runs unchanged against the driver's command-line boundary:

    nvidia-smi                                   the summary table
    nvidia-smi -L | --version
    nvidia-smi --query-gpu=FIELDS --format=csv[,noheader][,nounits]
    nvidia-smi --query-compute-apps=FIELDS --format=csv[,noheader][,nounits]

Memory in use comes from /etc/nvidia-smi-double/state.json (tests change it), e.g.

    {"flux_mib": 14000,
     "units": {"asoba-inference.service": 9000},
     "processes": [{"pid": 4242, "name": "python3", "used_mib": 512}],
     "utilization_gpu": 0}

Each unit's share (flux_mib is the share of flux-api.service) counts only while that systemd
unit is active, and is listed under its MainPID as a compute app, as the real tool lists the
process holding the memory. Unknown query fields fail the way the real tool fails: the message
on stdout and exit status 2. The real NVML path is exercised on a GPU machine, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = Path(os.environ.get("NVIDIA_SMI_DOUBLE_STATE", "/etc/nvidia-smi-double/state.json"))

DRIVER_VERSION = "535.183.01"
NVML_VERSION = "535.183"
CUDA_VERSION = "12.2"
GPU_NAME = "NVIDIA A10G"
GPU_UUID = "GPU-a10a5d9c-0e8b-4f2a-9c1d-6b3e2f7a1c04"
GPU_SERIAL = "1324521031337"
PCI_BUS_ID = "00000000:00:1E.0"
TOTAL_MIB = 23028
POWER_LIMIT_W = 300.0
FLUX_UNIT = "flux-api.service"

EXIT_INVALID_ARGUMENT = 2
EXIT_NOT_FOUND = 6


@dataclass(frozen=True)
class App:
    pid: int
    name: str
    used_mib: int


@dataclass(frozen=True)
class Gpu:
    used_mib: int
    reserved_mib: int
    utilization: int
    apps: list[App]

    @property
    def free_mib(self) -> int:
        return max(TOTAL_MIB - self.reserved_mib - self.used_mib, 0)


def _unit_main_pids(units: list[str]) -> dict[str, int]:
    """MainPID of each unit that is active (running), from systemd."""
    if not units:
        return {}
    try:
        out = subprocess.run(
            ["systemctl", "show", "--property=Id,MainPID,ActiveState", "--", *units],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pids: dict[str, int] = {}
    for block in out.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        pid = int(props.get("MainPID", "0") or 0)
        if props.get("ActiveState") in {"active", "reloading"} and pid > 0:
            pids[props.get("Id", "")] = pid
    return pids


def _process_name(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return "[Not Found]"


def load_gpu() -> Gpu:
    try:
        state = json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        state = {}
    units: dict[str, int] = {k: int(v) for k, v in dict(state.get("units", {})).items()}
    if "flux_mib" in state:
        units[FLUX_UNIT] = int(state["flux_mib"])
    apps: list[App] = []
    running = _unit_main_pids([u for u, mib in units.items() if mib > 0])
    for unit, mib in units.items():
        if unit in running:
            pid = running[unit]
            apps.append(App(pid, _process_name(pid), mib))
    for entry in state.get("processes", []):
        apps.append(
            App(int(entry["pid"]), str(entry.get("name", "python3")), int(entry["used_mib"]))
        )
    used = min(sum(a.used_mib for a in apps), TOTAL_MIB)
    return Gpu(
        used_mib=used,
        reserved_mib=int(state.get("reserved_mib", 0)),
        utilization=int(state.get("utilization_gpu", 0)),
        apps=apps,
    )


# field name -> (canonical name, unit, value). Aliases share the canonical name, which is what
# the real tool prints in the CSV header.
Field = tuple[str, str, Callable[[Gpu], str]]


def _gpu_fields() -> dict[str, Field]:
    fields: dict[str, Field] = {}

    def add(names: str, unit: str, value: Callable[[Gpu], str]) -> None:
        canonical = names.split()[0]
        for name in names.split():
            fields[name] = (canonical, unit, value)

    add("timestamp", "", lambda g: time.strftime("%Y/%m/%d %H:%M:%S.000"))
    add("driver_version", "", lambda g: DRIVER_VERSION)
    add("count", "", lambda g: "1")
    add("index", "", lambda g: "0")
    add("name gpu_name", "", lambda g: GPU_NAME)
    add("serial gpu_serial", "", lambda g: GPU_SERIAL)
    add("uuid gpu_uuid", "", lambda g: GPU_UUID)
    add("pci.bus_id gpu_bus_id", "", lambda g: PCI_BUS_ID)
    add("compute_cap", "", lambda g: "8.6")
    add("persistence_mode", "", lambda g: "Enabled")
    add("compute_mode", "", lambda g: "Default")
    add("pstate", "", lambda g: "P0" if g.apps else "P8")
    add("temperature.gpu", "", lambda g: "34" if g.apps else "27")
    add("fan.speed", "%", lambda g: "0")
    add("utilization.gpu", "%", lambda g: str(g.utilization))
    add("utilization.memory", "%", lambda g: "0")
    add("memory.total", "MiB", lambda g: str(TOTAL_MIB))
    add("memory.reserved", "MiB", lambda g: str(g.reserved_mib))
    add("memory.used", "MiB", lambda g: str(g.used_mib))
    add("memory.free", "MiB", lambda g: str(g.free_mib))
    add("power.draw", "W", lambda g: "58.23" if g.apps else "15.87")
    add("power.limit", "W", lambda g: f"{POWER_LIMIT_W:.2f}")
    add("enforced.power.limit", "W", lambda g: f"{POWER_LIMIT_W:.2f}")
    return fields


APP_FIELDS: dict[str, tuple[str, str, Callable[[App], str]]] = {}
for _names, _unit, _value in [
    ("timestamp", "", lambda a: time.strftime("%Y/%m/%d %H:%M:%S.000")),
    ("gpu_name", "", lambda a: GPU_NAME),
    ("gpu_bus_id", "", lambda a: PCI_BUS_ID),
    ("gpu_serial", "", lambda a: GPU_SERIAL),
    ("gpu_uuid", "", lambda a: GPU_UUID),
    ("pid", "", lambda a: str(a.pid)),
    ("process_name name", "", lambda a: a.name),
    ("used_gpu_memory used_memory", "MiB", lambda a: str(a.used_mib)),
]:
    for _name in _names.split():
        APP_FIELDS[_name] = (_names.split()[0], _unit, _value)


def _invalid_field(name: str) -> int:
    print(f'Field "{name}" is not a valid field to query.\n')
    return EXIT_INVALID_ARGUMENT


def _csv(fields: dict, query: str, fmt: str, rows: list) -> int:
    options = {o.strip() for o in fmt.split(",") if o.strip()}
    if "csv" not in options or not options <= {"csv", "noheader", "nounits"}:
        print(f'"{fmt}" is not a valid format. Valid formats are "csv", "noheader", "nounits".\n')
        return EXIT_INVALID_ARGUMENT
    names = [n.strip() for n in query.split(",") if n.strip()]
    if not names:
        return _invalid_field("")
    for name in names:
        if name not in fields:
            return _invalid_field(name)
    units = "nounits" not in options
    if "noheader" not in options:
        print(
            ", ".join(
                f"{fields[n][0]} [{fields[n][1]}]" if fields[n][1] else fields[n][0] for n in names
            )
        )
    for row in rows:
        values = []
        for n in names:
            _, unit, value = fields[n]
            text = value(row)
            values.append(f"{text} {unit}" if units and unit else text)
        print(", ".join(values))
    return 0


def _table(gpu: Gpu) -> None:
    width = 87  # between the outer bars, as the real tool draws it

    def line(inner: str) -> None:
        print("|" + inner.ljust(width)[:width] + "|")

    def cells(a: str, b: str, c: str) -> None:
        print(f"|{a:<41}|{b:<22}|{c:<22}|")

    busy = bool(gpu.apps)
    bar = "+" + "-" * width + "+"
    split = "+" + "-" * 41 + "+" + "-" * 22 + "+" + "-" * 22 + "+"
    print(time.strftime("%a %b %d %H:%M:%S %Y") + " " * 7)
    print(bar)
    line(
        f" NVIDIA-SMI {DRIVER_VERSION:<21} Driver Version: {DRIVER_VERSION:<14}"
        f" CUDA Version: {CUDA_VERSION}"
    )
    print("|" + split[1:-1] + "|")
    cells(
        " GPU  Name                 Persistence-M", " Bus-Id        Disp.A", " Volatile Uncorr. ECC"
    )
    cells(
        " Fan  Temp   Perf          Pwr:Usage/Cap", "         Memory-Usage", " GPU-Util  Compute M."
    )
    cells("", "", "               MIG M.")
    print("|" + "=" * 41 + "+" + "=" * 22 + "+" + "=" * 22 + "|")
    cells(f"   0  {GPU_NAME:<30}{'On':>3}", f" {PCI_BUS_ID} Off", f"{'0':>21}")
    power = f"{'58W' if busy else '16W'} / {int(POWER_LIMIT_W)}W"
    cells(
        f"{'0%':>4}{'34C' if busy else '27C':>6}{'P0' if busy else 'P8':>7}{power:>23}",
        f"{gpu.used_mib}MiB / {TOTAL_MIB}MiB".rjust(21),
        f"{str(gpu.utilization) + '%':>8}{'Default':>13}",
    )
    cells("", "", f"{'N/A':>21}")
    print(split)
    print(" " * (width + 2))
    print(bar)
    line(" Processes:")
    line("  GPU   GI   CI        PID   Type   Process name" + "GPU Memory".rjust(width - 48 - 1))
    line("        ID   ID" + "Usage".ljust(10).rjust(width - 15 - 1))
    print("|" + "=" * width + "|")
    if not gpu.apps:
        line("  No running processes found")
    for app in gpu.apps:
        name = app.name if len(app.name) <= 38 else "..." + app.name[-35:]
        left = f"    0   N/A  N/A  {app.pid:>9}      C   {name}"
        line(left + f"{app.used_mib}MiB".rjust(width - len(left) - 1))
    print(bar)


def _parse(argv: list[str]) -> dict[str, str] | None:
    """Long options as the real tool takes them (--opt=value or --opt value)."""
    opts: dict[str, str] = {}
    takes_value = {"--query-gpu", "--query-compute-apps", "--format", "--id", "-i"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in takes_value:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            opts["--id" if key == "-i" else key] = value
        elif arg in {"-L", "--list-gpus", "--version", "-h", "--help"}:
            opts[arg] = ""
        else:
            return None
        i += 1
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    if opts is None:
        print("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n")
        return EXIT_INVALID_ARGUMENT
    if "-h" in opts or "--help" in opts:
        print(__doc__)
        return 0
    if opts.get("--id", "0") not in {"0", GPU_UUID, PCI_BUS_ID}:
        print(f"No devices were found matching {opts['--id']!r}.")
        return EXIT_NOT_FOUND
    if "--version" in opts:
        print(f"NVIDIA-SMI version  : {DRIVER_VERSION}")
        print(f"NVML version        : {NVML_VERSION}")
        print(f"DRIVER version      : {DRIVER_VERSION}")
        print(f"CUDA Version        : {CUDA_VERSION}")
        return 0
    if "-L" in opts or "--list-gpus" in opts:
        print(f"GPU 0: {GPU_NAME} (UUID: {GPU_UUID})")
        return 0
    query_gpu = opts.get("--query-gpu")
    query_apps = opts.get("--query-compute-apps")
    if query_gpu is not None and query_apps is not None:
        print("Only one query option can be given at a time.\n")
        return EXIT_INVALID_ARGUMENT
    gpu = load_gpu()
    if query_gpu is not None or query_apps is not None:
        if "--format" not in opts:
            print('"--format" must be given with a query option, e.g. --format=csv.\n')
            return EXIT_INVALID_ARGUMENT
        if query_gpu is not None:
            return _csv(_gpu_fields(), query_gpu, opts["--format"], [gpu])
        return _csv(APP_FIELDS, query_apps or "", opts["--format"], gpu.apps)
    if "--format" in opts:
        print("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n")
        return EXIT_INVALID_ARGUMENT
    _table(gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
