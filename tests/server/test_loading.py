"""Load planning: device, dtype and quantization decided before any weight is read (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remote_service.engine.base import EngineLoadError
from remote_service.engine.loading import from_pretrained_kwargs, plan_load
from remote_service.settings import Settings


def checkpoint(tmp_path: Path, quant_method: str | None = None) -> Path:
    config: dict[str, object] = {"model_type": "qwen2"}
    if quant_method:
        config["quantization_config"] = {"quant_method": quant_method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


def plan(tmp_path: Path, cuda: int = 0, packages: tuple[str, ...] = (), **env: str):
    settings = Settings(model_dir=tmp_path, **env)  # type: ignore[arg-type]
    return plan_load(settings, cuda_devices=lambda: cuda, has_package=lambda p: p in packages)


def test_auto_is_cpu_fp32_without_gpu_and_cuda_bf16_with_one(tmp_path: Path) -> None:
    checkpoint(tmp_path)
    assert (plan(tmp_path).device, plan(tmp_path).dtype) == ("cpu", "float32")
    gpu = plan(tmp_path, cuda=1)
    assert (gpu.device, gpu.dtype) == ("cuda:0", "bfloat16")


@pytest.mark.parametrize("quant", ["bnb-4bit", "bnb-8bit", "awq"])
def test_quantization_without_gpu_is_one_clear_sentence(tmp_path: Path, quant: str) -> None:
    checkpoint(tmp_path, "awq")
    with pytest.raises(EngineLoadError) as info:
        plan(tmp_path, quantization=quant)
    msg = str(info.value)
    assert msg.startswith(f"ASOBA_QUANTIZATION={quant} needs a CUDA GPU")
    assert "\n" not in msg


def test_missing_quantization_packages_are_named(tmp_path: Path) -> None:
    checkpoint(tmp_path)
    with pytest.raises(EngineLoadError, match="needs the package\\(s\\) bitsandbytes"):
        plan(tmp_path, cuda=1, packages=("accelerate",), quantization="bnb-4bit")
    ok = plan(tmp_path, cuda=1, packages=("accelerate", "bitsandbytes"), quantization="bnb-4bit")
    assert ok.quantization == "bnb-4bit"


def test_awq_needs_a_prequantized_checkpoint_and_uses_fp16(tmp_path: Path) -> None:
    checkpoint(tmp_path)
    pkgs = ("gptqmodel", "accelerate")
    with pytest.raises(EngineLoadError, match="no AWQ quantization_config"):
        plan(tmp_path, cuda=1, packages=pkgs, quantization="awq")
    checkpoint(tmp_path, "awq")
    assert plan(tmp_path, cuda=1, packages=pkgs, quantization="awq").dtype == "float16"


def test_explicit_cuda_device_must_exist(tmp_path: Path) -> None:
    checkpoint(tmp_path)
    with pytest.raises(EngineLoadError, match="ASOBA_DEVICE=cuda:1 but this host has 1 CUDA"):
        plan(tmp_path, cuda=1, device="cuda:1")
    with pytest.raises(EngineLoadError, match="no CUDA device"):
        plan(tmp_path, device="cuda")


def test_checkpoint_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(EngineLoadError, match=r"has no config\.json"):
        plan(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineLoadError, match=r"no \*\.safetensors"):
        plan(tmp_path)


def test_bnb_4bit_uses_nf4_bf16_compute_and_double_quant(tmp_path: Path) -> None:
    import torch

    checkpoint(tmp_path)
    p = plan(tmp_path, cuda=1, packages=("accelerate", "bitsandbytes"), quantization="bnb-4bit")
    kwargs = from_pretrained_kwargs(p)
    qc = kwargs["quantization_config"]
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4"
    assert qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert qc.bnb_4bit_use_double_quant
    assert kwargs["device_map"] == "cuda:0" and kwargs["local_files_only"] is True
