"""Where and how the weights are loaded: device, dtype and quantization, checked up front.

:func:`plan_load` turns settings plus what this host has (CUDA? which packages?) into a
:class:`LoadPlan`, or raises :class:`EngineLoadError` with one readable sentence, e.g. asking
for 4-bit quantization on a host without a GPU. ``python -m remote_service`` runs it before
starting the server, so a misconfigured unit fails fast with that sentence, not a traceback.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_service.engine.base import EngineLoadError
from remote_service.settings import Settings

# What each quantization mode needs installed (transformers' own quantizers check the same).
QUANT_PACKAGES: dict[str, tuple[str, ...]] = {
    "bnb-4bit": ("bitsandbytes", "accelerate"),
    "bnb-8bit": ("bitsandbytes", "accelerate"),
    # transformers 5 loads AWQ checkpoints through gptqmodel's kernels (AutoAWQ is archived).
    "awq": ("gptqmodel", "accelerate"),
}


@dataclass(frozen=True)
class LoadPlan:
    model_dir: Path
    device: str  # "cpu" or "cuda:N"
    dtype: str  # "bfloat16" | "float16" | "float32"
    quantization: str


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_load(
    settings: Settings,
    *,
    cuda_devices: Callable[[], int] = _cuda_device_count,
    has_package: Callable[[str], bool] = _has_package,
) -> LoadPlan:
    """Decide device/dtype/quantization for ``settings`` on this host, or explain why not."""
    if settings.model_dir is None:
        raise EngineLoadError("ASOBA_MODEL_DIR is not set")
    model_dir = settings.model_dir
    if not (model_dir / "config.json").is_file():
        raise EngineLoadError(f"ASOBA_MODEL_DIR={model_dir} has no config.json")
    if not any(model_dir.glob("*.safetensors")):
        raise EngineLoadError(f"ASOBA_MODEL_DIR={model_dir} has no *.safetensors weights")

    n_cuda = cuda_devices()
    device = settings.device
    if device == "auto":
        device = "cuda:0" if n_cuda else "cpu"
    elif device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= n_cuda:
            found = f"{n_cuda} CUDA device(s)" if n_cuda else "no CUDA device"
            raise EngineLoadError(f"ASOBA_DEVICE={settings.device} but this host has {found}")
        device = f"cuda:{index}"

    quant = settings.quantization
    if quant != "none":
        if device == "cpu":
            raise EngineLoadError(
                f"ASOBA_QUANTIZATION={quant} needs a CUDA GPU, but the device is cpu "
                f"(ASOBA_DEVICE={settings.device}); use ASOBA_QUANTIZATION=none on this host"
            )
        missing = [p for p in QUANT_PACKAGES[quant] if not has_package(p)]
        if missing:
            raise EngineLoadError(
                f"ASOBA_QUANTIZATION={quant} needs the package(s) {', '.join(missing)}; "
                "install the 'gpu' extra (pip install 'model-deployer[server,gpu]')"
            )
        if quant == "awq" and _checkpoint_quant_method(model_dir) != "awq":
            raise EngineLoadError(
                f"ASOBA_QUANTIZATION=awq but {model_dir}/config.json has no AWQ "
                "quantization_config; AWQ needs a pre-quantized checkpoint"
            )

    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if quant == "awq" and dtype == "bfloat16":
        dtype = "float16"  # the AWQ kernels compute in fp16
    return LoadPlan(model_dir=model_dir, device=device, dtype=dtype, quantization=quant)


def _checkpoint_quant_method(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    return str(method).lower() if method else None


def from_pretrained_kwargs(plan: LoadPlan) -> dict[str, Any]:
    """Arguments for ``AutoModelForCausalLM.from_pretrained`` that realise ``plan``.

    ``device_map`` puts each safetensors tensor straight onto the device as it is read, with no
    full CPU copy first.
    """
    import torch

    dtype = getattr(torch, plan.dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": plan.device,
        "local_files_only": True,
    }
    if plan.quantization.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        if plan.quantization == "bnb-4bit":
            # nf4 with bf16 compute and double quantization: the defaults (fp4, fp32 compute)
            # are both slower and less accurate.
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    # AWQ: the checkpoint's own quantization_config (config.json) drives transformers.
    return kwargs
