"""GPU memory from NVML (nvidia-ml-py's ``pynvml``); zeros where there is no GPU or driver."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialised, False once it failed


@dataclass(frozen=True)
class GpuMemory:
    used_mib: int = 0
    total_mib: int = 0
    name: str | None = None
    count: int = 0


def _init() -> Any:
    global _nvml
    with _lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as exc:  # no driver, no library, no GPU: all mean "no GPU"
                log.info("NVML unavailable (%s): GPU figures will be 0", type(exc).__name__)
                _nvml = False
        return _nvml


def gpu_memory() -> GpuMemory:
    """Used and total memory summed over the host's GPUs, in MiB (what nvidia-smi shows)."""
    nvml = _init()
    if not nvml:
        return GpuMemory()
    try:
        count = int(nvml.nvmlDeviceGetCount())
        used = total = 0
        name = None
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            used += int(mem.used)
            total += int(mem.total)
            if name is None:
                raw = nvml.nvmlDeviceGetName(handle)
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
        return GpuMemory(used // _MIB, total // _MIB, name, count)
    except Exception as exc:
        log.warning("NVML query failed: %s", exc)
        return GpuMemory()
