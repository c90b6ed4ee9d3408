#!/usr/bin/env python3
"""Time ``deploy-model NAME --dry-run`` against the sandbox host, beside a naive baseline.

Three ways of learning the same host facts, run interleaved in one session, REPS times each:

  cli     ``deploy-model NAME --dry-run --json`` as a subprocess: the whole command (Python
          start, imports, config, SSH connect, the one-command probe, S3 metadata with ranged
          GETs in parallel, estimate, plan, JSON).
  probe   the probe alone, in-process: one Fabric connection, one remote command.
  naive   what a shell script does: one system ``ssh host CMD`` per fact, a new connection
          each (meminfo, nproc, df, two nvidia-smi queries and its version, systemctl show per
          unit, ss, the Python, torch and state file).

    scripts/bench_dry_run.py [--config .sandbox/config.toml] [--model demo-tiny] [--reps 10]

Needs the sandbox up (``make sandbox``) and, for ``cli``, its S3 environment
(``source .sandbox/env``) so that the model's metadata is read from S3. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deployer.config import Settings, load_settings  # noqa: E402
from deployer.probe import inspect_host  # noqa: E402
from deployer.ssh import SSHHost  # noqa: E402

NAIVE_COMMANDS = [
    "cat /proc/meminfo",
    "nproc",
    "df -B1 --output=avail,size /opt",
    "nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.free,driver_version"
    " --format=csv,noheader,nounits",
    "nvidia-smi --query-compute-apps=pid,process_name,used_memory,gpu_uuid"
    " --format=csv,noheader,nounits",
    "nvidia-smi --version",
    "systemctl show flux-api.service -p ActiveState,MainPID,MemoryCurrent,NRestarts",
    "systemctl show asoba-inference.service -p ActiveState,MainPID,MemoryCurrent,NRestarts",
    "ss -ltnH",
    "python3 --version",
    "python3 -c 'import importlib.metadata as m; print(m.version(\"torch\"))'",
    "cat /var/lib/model-deployer/current.json || true",
]


def ssh_argv(settings: Settings, command: str) -> list[str]:
    host = settings.host
    argv = [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ControlMaster=no",
        "-p",
        str(host.port),
        "-l",
        host.user,
    ]
    if host.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={host.known_hosts}"]
    if host.key_file:
        argv += ["-i", str(host.key_file)]
    return [*argv, str(host.address), command]


def naive(settings: Settings) -> None:
    for command in NAIVE_COMMANDS:
        subprocess.run(
            ssh_argv(settings, command),
            capture_output=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )


def probe(settings: Settings) -> None:
    with SSHHost(settings.host) as host:
        inspect_host(host, settings.remote)


def cli(model: str, config: Path) -> Callable[[Settings], None]:
    exe = Path(sys.executable).with_name("deploy-model")

    def run(settings: Settings) -> None:
        result = subprocess.run(
            [str(exe), model, "--dry-run", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode not in (0, 4):
            raise SystemExit(f"deploy-model failed ({result.returncode}): {result.stderr}")

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_config = os.environ.get("MODEL_DEPLOYER_CONFIG", str(REPO / ".sandbox/config.toml"))
    parser.add_argument("--config", type=Path, default=Path(default_config))
    parser.add_argument("--model", default="demo-tiny")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    settings = load_settings(args.config)
    ways: dict[str, Callable[[Settings], None]] = {
        "cli": cli(args.model, args.config),
        "probe": probe,
        "naive": naive,
    }
    for way in ways.values():  # warm up: page cache, host's Python, sshd
        way(settings)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.reps):
        for name, way in ways.items():
            started = time.perf_counter()
            way(settings)
            times[name].append(time.perf_counter() - started)

    med = {name: statistics.median(values) for name, values in times.items()}
    label = {
        "cli": f"`deploy-model {args.model} --dry-run --json` (whole command)",
        "probe": "probe only: 1 connection, 1 command",
        "naive": f"naive: {len(NAIVE_COMMANDS)} x `ssh host CMD`, new connection each",
    }
    print(
        f"host {settings.host.address} from {platform.node()}, {args.reps} repetitions "
        f"each, interleaved, after one warm-up; times in seconds\n"
    )
    print("| way | median | min | max | naive / this |")
    print("|---|---:|---:|---:|---:|")
    for name in ("naive", "probe", "cli"):
        values = times[name]
        print(
            f"| {label[name]} | {med[name]:.3f} | {min(values):.3f} | {max(values):.3f} "
            f"| {med['naive'] / med[name]:.1f}x |"
        )
    print(f"\nnaive commands: {shlex.join(['ssh', 'host', NAIVE_COMMANDS[0]])} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
