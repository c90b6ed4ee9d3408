"""The ``resources`` group, from the host probe's facts: RAM, disk under ``models_dir``, the
GPUs, and the Flux and inference units (state, RAM and GPU use)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .report import GB, CheckResult, Options, fail, gb_text, ok, warn

if TYPE_CHECKING:
    from ..catalog import ModelSpec
    from ..config import Settings
    from ..facts import HostFacts, UnitFacts


def check_ram(facts: HostFacts, min_gb: float) -> CheckResult:
    available, total = facts.memory.available_bytes, facts.memory.total_bytes
    value = f"{gb_text(available)} available of {gb_text(total)}"
    remedy = "free host memory (stop other services) or use a host with more RAM"
    if available < min_gb * GB:
        return fail("resources.ram", f"{value} (< {min_gb:g} GB)", remedy)
    if available < 2 * min_gb * GB:
        return warn("resources.ram", f"{value} (< {2 * min_gb:g} GB)", remedy)
    return ok("resources.ram", value)


def disk_thresholds(
    specs: Sequence[ModelSpec], margin_gb: float, min_disk_gb: float | None
) -> tuple[float, float]:
    """(fail below, warn below) in GB: an explicit minimum, else the selected models' sizes
    plus the margin: fail when not even the smallest fits, warn when the largest does not."""
    if min_disk_gb is not None:
        return min_disk_gb, min_disk_gb
    sizes = [spec.size_gb for spec in specs] or [0.0]
    return min(sizes) + margin_gb, max(sizes) + margin_gb


def check_disk(facts: HostFacts, thresholds: tuple[float, float]) -> CheckResult:
    disk = facts.disk
    if disk is None:
        errors = "; ".join(e for e in facts.errors if e.startswith("disk")) or "not measured"
        return fail("resources.disk", errors, "check that remote.models_dir is a valid path")
    fail_below, warn_below = thresholds
    where = (
        disk.path if disk.path == disk.measured_path else f"{disk.path} (at {disk.measured_path})"
    )
    value = f"{gb_text(disk.free_bytes)} free under {where}"
    remedy = f"free space under {disk.measured_path} (old model revisions) or grow the volume"
    if disk.free_bytes < fail_below * GB:
        return fail("resources.disk", f"{value}, needs ≥ {fail_below:g} GB", remedy)
    if disk.free_bytes < warn_below * GB:
        return warn(
            "resources.disk", f"{value}; the largest selected model needs {warn_below:g} GB", remedy
        )
    return ok("resources.disk", value)


def check_gpu(facts: HostFacts) -> CheckResult:
    gpu = facts.gpu
    if not gpu.devices:
        value = gpu.error or "no GPU found"
        remedy = "install the NVIDIA driver (nvidia-smi); without a GPU only CPU serving works"
        return warn("resources.gpu", value, remedy)
    devices = ", ".join(
        f"{d.name} {d.memory_total_mib} MiB ({d.memory_free_mib} MiB free)" for d in gpu.devices
    )
    driver = f"driver {gpu.driver_version or '?'}, CUDA {gpu.cuda_version or '?'}"
    return ok("resources.gpu", f"{len(gpu.devices)}× {devices}; {driver} via {gpu.source}")


def unit_usage(unit: UnitFacts, facts: HostFacts) -> str:
    """``active/running, RAM 1.2 GB, GPU 14000 MiB`` for a unit."""
    parts = [f"{unit.active_state}/{unit.sub_state}" if unit.sub_state else unit.active_state]
    if unit.active:
        parts.append(f"RAM {gb_text(unit.memory_bytes)}")
        used = [gpu.used_by_pids(unit.pid_set) for gpu in facts.gpu.devices]
        if used and all(u is not None for u in used):
            parts.append(f"GPU {sum(u or 0 for u in used) // (1024 * 1024)} MiB")
        elif used:
            parts.append("GPU use unknown")
    if unit.n_restarts:
        parts.append(f"{unit.n_restarts} restarts")
    return ", ".join(parts)


def check_flux_unit(facts: HostFacts) -> CheckResult:
    unit = facts.flux
    name = "resources.flux"
    if unit.load_state == "unknown":
        return fail(name, f"{unit.name}: state unknown", "see the systemd.units check")
    if unit.load_state == "not-found":
        return warn(
            name, f"{unit.name}: not installed", "set remote.flux_service to Flux's unit name"
        )
    value = f"{unit.name}: {unit_usage(unit, facts)}"
    if unit.active_state == "failed":
        return warn(name, value, f"see `sudo journalctl -u {unit.name}`")
    return ok(name, value)


def check_inference_unit(facts: HostFacts) -> CheckResult:
    unit = facts.inference
    name = "resources.inference"
    if unit.load_state == "unknown":
        return fail(name, f"{unit.name}: state unknown", "see the systemd.units check")
    if unit.load_state == "not-found":
        return ok(name, f"{unit.name}: not deployed")
    value = f"{unit.name}: {unit_usage(unit, facts)}"
    if unit.active_state == "failed":
        return warn(name, value, "see `model-deployer logs`; redeploy or `model-deployer undeploy`")
    return ok(name, value)


def check_resources(
    facts: HostFacts, settings: Settings, specs: Sequence[ModelSpec], options: Options
) -> list[CheckResult]:
    policy = settings.policy
    min_ram = policy.ram_margin_gb if options.min_ram_gb is None else options.min_ram_gb
    thresholds = disk_thresholds(specs, policy.disk_margin_gb, options.min_disk_gb)
    rows = [
        check_ram(facts, min_ram),
        check_disk(facts, thresholds),
        check_gpu(facts),
        check_flux_unit(facts),
        check_inference_unit(facts),
    ]
    return [replace(r, duration_s=facts.duration_s) for r in rows]
