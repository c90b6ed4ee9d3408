"""The planner on the g5.4xlarge of the reference documents, with the real models' shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployer.catalog import load_catalog
from deployer.config import PolicyConfig, Settings
from deployer.estimate import Estimate
from deployer.facts import HostFacts
from deployer.make_plan import estimates_for, read_metas, specs_to_read
from deployer.model_meta import ModelMeta
from deployer.planner import (
    Plan,
    PlanFlags,
    decision_changes,
    headroom,
    plan_deployment,
    plan_json,
)
from tests import model_shapes as ms
from tests.fakes import GB, g5_facts, probe_json
from tests.model_metadata import StaticMetadata, meta_from_tensors

CATALOG = load_catalog()
SETTINGS = Settings()
STEP_NAMES = [
    "lock",
    "re-inspect",
    "install-venv",
    "pull-weights",
    "render-unit",
    "start",
    "wait-healthy",
    "write-discovery-env",
    "audit",
]


def all_metas() -> dict[str, ModelMeta]:
    return {
        n: meta_from_tensors(CATALOG.models[n], ms.config(n), ms.model_shards(n)) for n in ms.MODELS
    }


METAS = all_metas()


def estimates(
    name: str, *, without: tuple[str, ...] = (), settings: Settings = SETTINGS
) -> dict[str, Estimate]:
    source = StaticMetadata({k: v for k, v in METAS.items() if k not in without})
    metas = read_metas(specs_to_read(CATALOG.models[name], CATALOG), source)
    if without:  # a variant that is not in S3: found nowhere, not merely unreadable
        metas = {
            k: (v.model_copy(update={"exists": False}) if k in without else v)
            for k, v in metas.items()
        }
    return estimates_for(metas, CATALOG, settings)


def plan(
    name: str,
    facts: HostFacts | None = None,
    *,
    force: str | None = None,
    settings: Settings = SETTINGS,
    without: tuple[str, ...] = (),
    engine: str | None = None,
) -> Plan:
    return plan_deployment(
        CATALOG.models[name],
        CATALOG,
        estimates(name, without=without, settings=settings),
        facts or g5_facts(),
        settings,
        PlanFlags(force_quantize=force, engine=engine),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- the table

G5 = (
    # model,                 expected action, stop_flux, port, quantization, weights from, engine
    ("mistral_policy_analysis", "coexist", False, 8001, "none", "mistral_policy_analysis", "vllm"),
    ("mistral_iac_generation", "coexist", False, 8001, "none", "mistral_iac_generation", "vllm"),
    ("qwen3-14b", "replace", True, 8000, "awq", "qwen3-14b-awq", "vllm"),
    ("qwen3-14b-awq", "replace", True, 8000, "awq", "qwen3-14b-awq", "vllm"),
    ("qwen3-coder-30b", "replace", True, 8000, "bnb-4bit", "qwen3-coder-30b", "transformers"),
    ("deepseek-r1-8b", "replace", True, 8000, "none", "deepseek-r1-8b", "vllm"),
    ("demo-tiny", "coexist", False, 8001, "none", "demo-tiny", "transformers"),
)


@pytest.mark.parametrize(("name", "action", "stop_flux", "port", "quant", "weights", "engine"), G5)
def test_g5_profile(
    name: str, action: str, stop_flux: bool, port: int, quant: str, weights: str, engine: str
) -> None:
    p = plan(name)
    assert (p.action, p.stop_flux, p.port, p.quantization, p.weights_model, p.engine) == (
        action,
        stop_flux,
        port,
        quant,
        weights,
        engine,
    )
    assert p.needs.gpu_bytes <= p.headroom.gpu_bytes
    assert p.needs.ram_bytes <= p.headroom.ram_bytes
    assert p.needs.disk_bytes <= p.headroom.disk_bytes
    assert p.reasons and p.steps and p.service is not None
    names = [s.name for s in p.steps if s.name != "bootstrap"]
    expected = list(STEP_NAMES)
    if stop_flux:
        expected.insert(expected.index("start"), "stop-flux")
    if engine == "vllm":
        expected.insert(expected.index("install-venv") + 1, "install-engine")
    assert names == expected
    assert p.service is not None and p.service.engine == engine
    assert (p.service.vllm is not None) == (engine == "vllm")
    assert p.endpoints[0].endswith(f":{port}/status")
    assert {e.rsplit(str(port), 1)[1] for e in p.endpoints} == {
        "/status",
        "/health",
        "/generate",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
    }


def test_qwen3_14b_without_awq_in_s3_goes_bnb_4bit() -> None:
    p = plan("qwen3-14b", without=("qwen3-14b-awq",))
    assert (p.action, p.stop_flux, p.port, p.quantization) == ("replace", True, 8000, "bnb-4bit")
    assert any("qwen3-14b-awq is not in S3" in r for r in p.reasons)
    assert any("> quantize_above_gb 20" in r for r in p.reasons)


def test_qwen3_14b_reasons_carry_the_numbers() -> None:
    p = plan("qwen3-14b", engine="transformers")  # the transformers engine's figures
    assert p.reasons == [
        "qwen3-14b: 14.77B parameters, BF16, 29.5 GB stored, from S3 metadata",
        "16-bit needs 33.7 GB GPU (weights 29.5 GB + KV cache 2.7 GB + activations 0.6 GB"
        " + runtime 0.8 GB) > quantize_above_gb 20 GB: quantizing",
        "AWQ 4-bit (qwen3-14b-awq): not small (14.1 GB > coexist_max_gb 3 GB), so not beside"
        " Flux; fits with Flux stopped: GPU 14.1 GB <= 23.1 GB (free 9.5 GB + freed 14.7 GB"
        " - margin 1 GB), RAM 12.1 GB <= 58.0 GB, disk 10.0 GB <= 198.0 GB",
        "stops flux-api.service (frees 14.7 GB GPU and 34.0 GB RAM); port 8000",
    ]


def test_force_quantize_quantizes_a_small_model() -> None:
    p = plan("mistral_policy_analysis", force="4bit")
    assert (p.action, p.port, p.quantization) == ("coexist", 8001, "bnb-4bit")
    assert any("--force-quantize 4bit" in r for r in p.reasons)
    p8 = plan("deepseek-r1-8b", force="8bit")
    assert (p8.action, p8.quantization) == ("replace", "bnb-8bit")


def test_force_quantize_4bit_prefers_the_awq_variant() -> None:
    assert plan("qwen3-14b", force="4bit").quantization == "awq"
    assert plan("qwen3-14b", force="8bit").quantization == "bnb-8bit"


def test_force_quantize_on_a_prequantized_model_is_noted() -> None:
    p = plan("qwen3-14b-awq", force="8bit")
    assert p.quantization == "awq"
    assert any("ignored" in r for r in p.reasons)


def test_prefer_quality_takes_8bit_when_it_fits() -> None:
    quality = Settings(policy=PolicyConfig(prefer_quality=True))
    assert plan("qwen3-14b", settings=quality, without=("qwen3-14b-awq",)).quantization == (
        "bnb-8bit"
    )
    # 30B at 8 bits is 34 GB: does not fit, so 4-bit
    assert plan("qwen3-coder-30b", settings=quality).quantization == "bnb-4bit"


def test_small_model_replaces_when_flux_leaves_too_little_gpu() -> None:
    p = plan("mistral_policy_analysis", g5_facts(flux_gpu_mib=22500), engine="transformers")
    assert (p.action, p.stop_flux, p.port) == ("replace", True, 8000)
    assert p.options[0].verdict.startswith(
        "16-bit: does not fit beside Flux (GPU 1.5 GB > 0.0 GB); fits with Flux stopped"
    )


def test_small_model_replaces_when_ram_is_short() -> None:
    p = plan("mistral_iac_generation", g5_facts(ram_available_bytes=3 * GB))
    assert p.action == "replace"
    assert "does not fit beside Flux (RAM 2.7 GB > 1.0 GB)" in p.options[0].verdict


def test_refuse_with_numbers_when_nothing_fits() -> None:
    facts = g5_facts(other_gpu_mib=20000)  # someone else holds 20 GB
    p = plan("qwen3-coder-30b", facts)
    assert p.action == "refuse" and p.port is None and not p.stop_flux and p.steps == []
    assert p.reasons[-1].startswith("refuse: nothing fits; the smallest option")
    assert "GB GPU" in p.refusal_message()
    assert p.service is None and p.after is None


def test_refuse_for_disk() -> None:
    p = plan("qwen3-coder-30b", g5_facts(disk_free_bytes=30 * GB))
    assert p.action == "refuse"
    assert "does not fit with Flux stopped (disk 61.1 GB > 28.0 GB)" in p.options[-1].verdict


def test_no_gpu_refuses_and_says_why() -> None:
    p = plan("demo-tiny", g5_facts(no_gpu=True))
    assert p.action == "refuse"
    assert "no GPU on the host (no NVIDIA driver tools: nvidia-smi not found)" in p.reasons[-1]
    assert "CPU-only serving is not planned" in p.reasons[-1]


def test_flux_not_running_big_model_takes_8000_without_stopping_anything() -> None:
    p = plan("deepseek-r1-8b", g5_facts(flux_active=False))
    assert (p.action, p.stop_flux, p.port) == ("replace", False, 8000)
    assert "stop-flux" not in [s.name for s in p.steps]
    assert any("left as it is" in r for r in p.reasons)


def test_our_running_service_counts_as_free_and_its_port_is_ours() -> None:
    deployed = {"schema": 1, "model": "deepseek-r1-8b", "port": 8000, "quantization": "none"}
    facts = g5_facts(
        flux_active=False,
        ours_active=True,
        ours_gpu_mib=19000,
        ours_ram_bytes=20 * GB,
        deployed=deployed,
    )
    p = plan("qwen3-14b", facts)
    assert (p.action, p.port, p.quantization) == ("replace", 8000, "awq")
    assert p.facts.inference_gpu_mib == 19000
    start = next(s for s in p.steps if s.name == "start")
    assert "replacing deepseek-r1-8b" in start.description


def test_port_held_by_a_stranger_blocks_coexist() -> None:
    p = plan("demo-tiny", g5_facts(listeners=[22, 8000, 8001]))
    assert p.action == "replace"
    assert "port 8001 is in use by a process the plan does not stop" in p.options[0].verdict
    p = plan("demo-tiny", g5_facts(flux_active=False, listeners=[8000, 8001]))
    assert p.action == "refuse"


def test_unattributed_flux_memory_is_not_counted_as_freeable() -> None:
    facts = g5_facts(per_process=False)
    room = headroom(facts, "replace", SETTINGS.policy)
    assert room.gpu_freed_bytes == 0
    p = plan("deepseek-r1-8b", facts)
    assert any("does not say how much flux-api.service holds" in w for w in p.warnings)
    assert p.action == "refuse"  # 19.5 GB cannot be shown to fit 9.5 GB free


def test_catalog_fallback_is_said_in_the_plan() -> None:
    spec = CATALOG.models["deepseek-r1-8b"]
    metas = read_metas([spec], StaticMetadata({}))
    p = plan_deployment(
        spec, CATALOG, estimates_for(metas, CATALOG, SETTINGS), g5_facts(), SETTINGS
    )
    assert p.estimate.source == "catalog"
    assert any("from the catalog's figures" in w for w in p.warnings)
    assert p.action == "replace" and p.quantization == "none"


def test_bootstrap_step_is_placed_before_start() -> None:
    names = [s.name for s in plan("mistral_policy_analysis").steps]
    assert names.index("bootstrap") == names.index("start") - 1


# --------------------------------------------------------------------------- plan as data


def test_plan_json_has_the_required_keys_and_round_trips() -> None:
    p = plan("qwen3-14b", engine="transformers")  # need_gb: the transformers engine's need
    data = plan_json(p)
    assert list(data)[:10] == [
        "model",
        "action",
        "stop_flux",
        "port",
        "quantization",
        "need_gb",
        "gpu_free_gb",
        "reasons",
        "steps",
        "facts",
    ]
    assert data["need_gb"] == pytest.approx(14.1, abs=0.05)
    assert data["gpu_free_gb"] == pytest.approx(9.47, abs=0.01)
    assert data["facts"]["flux_state"] == "active"
    text = json.dumps(data)
    back = Plan.model_validate(json.loads(text))
    assert back == p
    assert back.still_holds(g5_facts()) == []


def test_same_facts_same_plan() -> None:
    a, b = plan("qwen3-coder-30b"), plan("qwen3-coder-30b")
    assert a == b and a.plan_id == b.plan_id and len(a.plan_id) == 16


def test_the_plan_id_is_the_decision_not_the_reading() -> None:
    """Facts that drift without changing the decision (Flux's share, when they were read)
    leave the id alone; a different decision is a different id."""
    a = plan("qwen3-coder-30b")
    drifted = plan("qwen3-coder-30b", g5_facts(flux_gpu_mib=13000))
    assert drifted.facts != a.facts and drifted.plan_id == a.plan_id
    beside, alone = plan("demo-tiny"), plan("demo-tiny", g5_facts(flux_gpu_mib=22800))
    assert (beside.action, alone.action) == ("coexist", "replace")
    assert beside.plan_id != alone.plan_id
    assert decision_changes(beside, alone)[0].startswith('action: "coexist" in the plan')


def _moved(**kwargs: Any) -> list[str]:
    # transformers: its need is the estimate (vLLM's is its claim, tested in test_vllm_plans)
    return plan("qwen3-14b", engine="transformers").still_holds(g5_facts(**kwargs))


def test_still_holds_reports_what_moved() -> None:
    assert _moved() == []
    assert _moved(flux_gpu_mib=13500) == []  # drifted, still fits
    assert _moved(other_gpu_mib=9000) == ["GPU: needs 14.1 GB, headroom now 13.7 GB"]
    assert _moved(flux_active=False) == ["flux-api.service was active, now inactive"]
    moved = _moved(deployed={"model": "demo-tiny", "port": 8001}, ours_active=True)
    assert "deployed model was none, now demo-tiny on port 8001 (none)" in moved
    assert "asoba-inference.service was inactive, now active" in moved
    rebooted = HostFacts.model_validate(probe_json() | {"boot_id": "boot-2"})
    assert plan("qwen3-14b", engine="transformers").still_holds(rebooted) == [
        "the host rebooted since the plan (boot id changed)"
    ]
    assert _moved(listeners=[22, 8000], flux_active=False)[-1] == (
        "port 8000 is in use by a process the plan does not stop"
    )
    assert (
        plan("qwen3-14b")
        .still_holds(g5_facts(no_gpu=True))[0]
        .startswith("GPU 0 was NVIDIA A10G (23028 MiB), now absent")
    )


def test_refused_plan_never_holds() -> None:
    p = plan("qwen3-coder-30b", g5_facts(other_gpu_mib=20000))
    assert p.still_holds(g5_facts()) == ["the plan refused: there is nothing to apply"]


def test_service_spec_for_apply() -> None:
    p = plan("qwen3-14b")
    assert p.service is not None
    assert p.service.model_dump() == {
        "unit": "asoba-inference.service",
        "port": 8000,
        "gpu_index": 0,
        "weights_model": "qwen3-14b-awq",
        "weights_uri": "s3://asoba-llm-cache/models/qwen3-14b-awq/",
        "weights_dir": "/opt/models/qwen3-14b-awq",
        "install_dir": "/opt/asoba-inference",
        "quantization": "awq",
        "torch_dtype": "float16",
        "max_context_tokens": 4096,
        "max_concurrent_seqs": 4,
        "memory_max": "32G",
        "cpu_quota": "800%",
        "engine": "vllm",
        "vllm": {
            "package": "vllm",
            "gpu_memory_utilization": 0.95,
            "max_model_len": 4096,
            "max_num_seqs": 4,
            "tensor_parallel_size": 1,
            "gpu_indices": [0],
            "kv_cache_bytes": p.service.vllm.kv_cache_bytes if p.service.vllm else None,
            # 4 sequences x 4096 tokens (256 whole blocks each) x Qwen3-14B's K and V per token
            # (40 layers x 8 KV heads x 128 x 2 x 2 bytes)
            "kv_least_bytes": 4 * 4096 * 40 * 8 * 128 * 2 * 2,
            "tool_call_parser": "hermes",  # the catalog's, for tools on /v1
        },
    }
    assert p.service.vllm is not None and p.service.vllm.kv_cache_bytes > 10 * GB


def test_spare_after_deploy_is_headroom_less_need() -> None:
    """The plan's memory table reads one way: both columns are after the safety margins."""
    for name in ("qwen3-14b", "mistral_iac_generation", "demo-tiny"):
        p = plan(name)
        assert p.after is not None
        for part in ("gpu_bytes", "ram_bytes", "disk_bytes"):
            room, need = getattr(p.headroom, part), getattr(p.needs, part)
            assert getattr(p.after, part) == room - need <= room
