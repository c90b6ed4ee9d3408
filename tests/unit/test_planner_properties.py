"""Properties of the planner over random hosts, models and policies (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.catalog import Catalog, load_catalog, parse_catalog
from deployer.config import PolicyConfig, Settings
from deployer.facts import HostFacts
from deployer.make_plan import estimates_for, read_metas, specs_to_read
from deployer.planner import Plan, PlanFlags, headroom, plan_deployment
from tests import model_shapes as ms
from tests.fakes import FLUX_PID, GB, OURS_PID, probe_json
from tests.model_metadata import StaticMetadata, meta_from_tensors

CATALOG = load_catalog()
METAS = {
    n: meta_from_tensors(CATALOG.models[n], ms.config(n), ms.model_shards(n)) for n in ms.MODELS
}


@st.composite
def host_facts(draw: st.DrawFn) -> HostFacts:
    flux_active = draw(st.booleans())
    ours_active = draw(st.booleans())
    per_process = draw(st.booleans())
    gpus = []
    for index in range(draw(st.integers(0, 2))):
        total = draw(st.sampled_from([8192, 16384, 23028, 40960, 81920]))
        flux = draw(st.integers(0, total)) if flux_active and index == 0 else 0
        ours = draw(st.integers(0, total - flux)) if ours_active else 0
        other = draw(st.integers(0, total - flux - ours))
        procs = [
            p
            for p in (
                {"pid": FLUX_PID, "name": "python3", "used_mib": flux, "gpu_uuid": f"GPU-{index}"},
                {"pid": OURS_PID, "name": "python", "used_mib": ours, "gpu_uuid": f"GPU-{index}"},
                {"pid": 777, "name": "x", "used_mib": other, "gpu_uuid": f"GPU-{index}"},
            )
            if p["used_mib"]
        ]
        used = flux + ours + other
        gpus.append(
            {
                "index": index,
                "uuid": f"GPU-{index}",
                "name": "GPU",
                "memory_total_mib": total,
                "memory_used_mib": used,
                "memory_free_mib": total - used,
                "processes": procs if per_process else None,
            }
        )
    ram_total = draw(st.integers(4, 512)) * GB
    deployed = None
    if ours_active and draw(st.booleans()):
        deployed = {
            "model": "demo-tiny",
            "port": draw(st.sampled_from([8000, 8001])),
            "quantization": "none",
        }
    data = probe_json(
        gpus=gpus,
        flux_active=flux_active,
        flux_ram_bytes=draw(st.integers(0, ram_total // GB)) * GB,
        ours_active=ours_active,
        ours_ram_bytes=draw(st.integers(0, 64)) * GB,
        ram_total_bytes=ram_total,
        ram_available_bytes=draw(st.integers(0, ram_total // GB)) * GB,
        disk_free_bytes=draw(st.integers(0, 1000)) * GB,
        deployed=deployed,
        listeners=draw(st.sets(st.sampled_from([22, 8000, 8001, 9000]))),
        no_gpu=not gpus,
    )
    return HostFacts.model_validate(data)


policies = st.builds(
    PolicyConfig,
    coexist_max_gb=st.floats(0, 10),
    quantize_above_gb=st.floats(1, 80),
    gpu_margin_gb=st.floats(0, 4),
    ram_margin_gb=st.floats(0, 8),
    disk_margin_gb=st.floats(0, 8),
    prefer_quality=st.booleans(),
    context_tokens=st.sampled_from([512, 2048, 4096, 32768]),
    concurrent_seqs=st.integers(1, 16),
)


@st.composite
def random_catalog(draw: st.DrawFn) -> Catalog:
    """The real catalog plus a random raw model (known only by its catalog figures)."""
    params = draw(st.floats(0.01, 200))
    data: dict[str, Any] = {
        "bucket": CATALOG.bucket,
        "models": {
            name: spec.model_dump(exclude={"name"}, mode="json")
            for name, spec in CATALOG.models.items()
        },
    }
    data["models"]["random-model"] = {
        "tier": "raw",
        "s3_prefix": "models/random/",
        "parameters_b": params,
        "size_gb": params * draw(st.sampled_from([0.55, 2, 4])),
        "context_length": draw(st.sampled_from([2048, 32768])),
    }
    return parse_catalog(data)


def make(
    name: str,
    catalog: Catalog,
    facts: HostFacts,
    policy: PolicyConfig,
    force: str | None,
    awq_in_s3: bool,
) -> Plan:
    settings = Settings(policy=policy)
    metas = {k: v for k, v in METAS.items() if awq_in_s3 or k != "qwen3-14b-awq"}
    spec = catalog.models[name]
    found = read_metas(specs_to_read(spec, catalog), StaticMetadata(metas))
    estimates = estimates_for(found, catalog, settings)
    return plan_deployment(
        spec, catalog, estimates, facts, settings, PlanFlags(force_quantize=force)
    )  # type: ignore[arg-type]


cases = st.tuples(
    random_catalog(),
    st.sampled_from([*sorted(CATALOG.models), "random-model"]),
    host_facts(),
    policies,
    st.sampled_from([None, "4bit", "8bit"]),
    st.booleans(),
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(cases)
def test_no_plan_needs_more_than_its_headroom(case: tuple[Any, ...]) -> None:
    catalog, name, facts, policy, force, awq = case
    plan = make(name, catalog, facts, policy, force, awq)
    if plan.action == "refuse":
        return
    assert plan.needs.gpu_bytes <= plan.headroom.gpu_bytes
    assert plan.needs.ram_bytes <= plan.headroom.ram_bytes
    assert plan.needs.disk_bytes <= plan.headroom.disk_bytes
    # the headroom is the one the facts give, independently recomputed
    room = headroom(facts, plan.action, policy, gpu_index=plan.gpu_index)
    assert room.usable == plan.headroom
    assert room.usable.gpu_bytes <= room.raw.gpu_bytes
    # and the plan holds against the very facts it was made from
    assert plan.still_holds(facts) == []
    assert plan.after is not None and plan.after.gpu_bytes >= 0
    assert plan.port == (policy.coexist_port if plan.action == "coexist" else policy.replace_port)
    assert not plan.stop_flux or (plan.action == "replace" and facts.flux.active)
    if plan.action == "coexist":
        assert plan.needs.gpu_bytes <= policy.coexist_max_gb * GB


@FAST
@given(cases)
def test_same_facts_same_plan(case: tuple[Any, ...]) -> None:
    catalog, name, facts, policy, force, awq = case
    a = make(name, catalog, facts, policy, force, awq)
    b = make(name, catalog, facts.model_copy(deep=True), policy, force, awq)
    assert a == b and a.plan_id == b.plan_id
    assert Plan.model_validate(json.loads(json.dumps(a.to_json()))) == a


@FAST
@given(cases)
def test_a_refusal_always_says_why(case: tuple[Any, ...]) -> None:
    catalog, name, facts, policy, force, awq = case
    plan = make(name, catalog, facts, policy, force, awq)
    if plan.action != "refuse":
        return
    assert plan.reasons and plan.reasons[-1].startswith("refuse: ")
    assert plan.refusal_message()
    assert any(ch.isdigit() for ch in plan.reasons[-1]) or "no GPU" in plan.reasons[-1]
    assert plan.steps == [] and plan.port is None and not plan.stop_flux
