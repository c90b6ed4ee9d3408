"""The planner: a pure function from (model, catalog, estimates, host facts, settings, flags)
to a ``Plan``. No I/O; the same inputs give the same plan, byte for byte.

Rules, in order (every decision records its reason, in words and numbers):

1. No GPU on the host: refuse. CPU-only serving of these models is not planned: the smallest
   catalog model would run, but the operator expects a GPU service, and a silent CPU fallback
   would hide a broken driver. (The sandbox host has an ``nvidia-smi`` test double, so its
   normal path is the GPU path.)
2. Candidates, in order of preference:
   a. pre-quantized checkpoints (``format: awq``) run only as themselves (AWQ);
   b. unquantized (16-bit), unless ``--force-quantize`` or its GPU need exceeds
      ``policy.quantize_above_gb``;
   c. the catalog's AWQ variant, when one is named and its weights were found in S3
      (not with ``--force-quantize 8bit``);
   d. bitsandbytes: 8-bit then 4-bit with ``policy.prefer_quality``, else 4-bit;
      ``--force-quantize 8bit|4bit`` picks one.
3. Each candidate in turn is placed:
   * coexist (beside Flux, ``policy.coexist_port``, 8001) when its GPU need is at most
     ``policy.coexist_max_gb`` and it fits the measured free GPU memory, available RAM and
     free disk less the margins;
   * else replace (stop Flux, ``policy.replace_port``, 8000) when it fits with Flux's measured
     GPU memory and RAM added back.
   Memory held by our own running inference unit counts as free in both: a deploy replaces it.
   The target port must be free, or held by a unit the plan stops.
4. The first candidate that is placed is the plan; when none is, refuse with the numbers.
5. The engine serving it (``Plan.engine``, and why in ``Plan.engine_reason``): ``--engine``,
   else the catalog entry's ``engine`` (when not auto), else ``[policy] engine``, else auto.
   auto is vLLM for 16-bit and pre-quantized (AWQ) checkpoints and transformers for
   bitsandbytes, which quantizes on load: vLLM is never used with bitsandbytes, so under
   ``--engine vllm`` a bitsandbytes candidate is refused (the next one is tried).
   A vLLM candidate is placed by ``deployer.vllm_memory``: it claims
   ``gpu_memory_utilization`` x the GPU's total memory (the placement's usable memory over the
   total, rounded down, at most 0.95; beside Flux at most ``coexist_max_gb`` too) and fits when
   its weights, profile activations, CUDA graphs, runtime and the KV cache for
   ``concurrent_seqs`` x ``context_tokens`` fit in that claim. On a host with several GPUs, a
   vLLM candidate that fits no single GPU may be spread with tensor parallelism (2, 4 or 8
   GPUs, dividing its heads) when it replaces Flux.

A plan never needs more than the headroom it was checked against (tests prove it over random
hosts). ``Plan.still_holds(new_facts)`` re-checks a plan against a fresh probe: the apply
stage calls it after taking the host lock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

from . import vllm_memory as vm
from .catalog import Catalog, ModelSpec
from .config import Engine, EngineChoice, PolicyConfig, Settings, VllmPackage
from .estimate import GB, Estimate, Need, Quantization, size_text
from .facts import MIB, Gpu, HostFacts
from .vllm_memory import VllmFit, VllmNeed

PLAN_SCHEMA = 1
Action = Literal["coexist", "replace", "refuse"]
Placement = Literal["coexist", "replace"]
ForceQuantize = Literal["4bit", "8bit"]
ENDPOINT_PATHS = (
    "/status",
    "/health",
    "/generate",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
)


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlanFlags(_Data):
    force_quantize: ForceQuantize | None = None
    engine: EngineChoice | None = None  # --engine; None: not given


class Resources(_Data):
    gpu_bytes: int
    ram_bytes: int
    disk_bytes: int

    def gb(self) -> dict[str, float]:
        return {
            "gpu": _gb2(self.gpu_bytes),
            "ram": _gb2(self.ram_bytes),
            "disk": _gb2(self.disk_bytes),
        }


class Headroom(_Data):
    """What a placement can use on one GPU, RAM and disk, before and after the margins."""

    placement: Placement
    gpu_index: int | None
    gpu_free_bytes: int  # measured free on that GPU
    gpu_freed_bytes: int  # what stopping Flux (replace) and our old service gives back
    ram_available_bytes: int
    ram_freed_bytes: int
    disk_free_bytes: int
    raw: Resources  # free + freed
    usable: Resources  # raw - margins (never below 0)
    notes: list[str] = []


StepParam = str | int | float | bool | None


class PlanStep(_Data):
    """One step of the deploy: ``name`` picks what apply runs (``deployer.apply.STEPS``),
    ``params`` are what the plan decided for it, ``description`` says it in words."""

    name: str
    description: str
    params: dict[str, StepParam] = {}


class Option(_Data):
    """One way of serving the model the planner considered."""

    quantization: Quantization
    weights_model: str
    need: Resources
    placement: Action  # where it fits; "refuse": nowhere
    verdict: str


class DeployedDigest(_Data):
    model: str
    port: int
    quantization: str
    revision: str | None = None


class FactsDigest(_Data):
    """The facts the plan relied on; ``still_holds`` compares a fresh probe with these."""

    hostname: str
    boot_id: str | None
    collected_at: float
    gpu_source: str
    gpu_index: int | None
    gpu_name: str | None
    gpu_total_mib: int | None
    gpu_free_mib: int | None
    flux_gpu_mib: int | None  # None: the driver did not say per process
    inference_gpu_mib: int | None
    ram_total_bytes: int
    ram_available_bytes: int
    flux_state: str
    flux_ram_bytes: int
    inference_state: str
    inference_ram_bytes: int
    disk_free_bytes: int | None
    deployed: DeployedDigest | None
    listening_ports: list[int]


class EstimateDigest(_Data):
    source: Literal["s3", "catalog"]
    exact: bool
    parameters: int
    stored_dtype: str
    context_tokens: int
    concurrent_seqs: int
    weights_bytes: int
    kv_cache_bytes: int  # vllm: the KV cache it gets (per GPU), all its claim leaves
    activation_bytes: int
    runtime_bytes: int
    cuda_graph_bytes: int = 0  # vllm only
    kv_cache_tokens: int | None = None  # vllm: the tokens its KV cache holds, in all


class VllmSpec(_Data):
    """How vLLM is started (rendered into the unit's environment). ``kv_cache_bytes`` is the
    KV cache each of its GPUs gets (what vLLM logs as available KV cache memory)."""

    package: VllmPackage
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    tensor_parallel_size: int
    gpu_indices: list[int]
    kv_cache_bytes: int
    # The least KV cache the plan is for (max_num_seqs whole sequences of max_model_len): what a
    # CPU build, whose cache is host RAM sized by the service, is given.
    kv_least_bytes: int
    tool_call_parser: str | None = None  # the catalog's; tools on /v1 need it


class ServiceSpec(_Data):
    """What apply installs: the unit, where the weights go, how the server is started."""

    unit: str
    port: int
    gpu_index: int
    weights_model: str
    weights_uri: str
    weights_dir: str
    install_dir: str
    quantization: Quantization
    torch_dtype: Literal["bfloat16", "float16"]
    max_context_tokens: int
    max_concurrent_seqs: int
    memory_max: str
    cpu_quota: str
    engine: Engine
    vllm: VllmSpec | None  # None: the transformers engine


class Plan(_Data):
    """A deployment plan. JSON: ``plan.to_json()``; back: ``Plan.model_validate(data)``."""

    schema_version: int = PLAN_SCHEMA
    plan_id: str = ""
    model: str
    revision: str | None
    target: str | None  # host address from the settings
    action: Action
    stop_flux: bool
    port: int | None
    quantization: Quantization
    weights_model: str
    engine: Engine  # the engine of the chosen option (refused: of the smallest one)
    engine_reason: str  # why, in words: "vllm: 16-bit checkpoint (auto)"
    need_gb: float  # GPU need of the chosen option (vllm: what it claims, on each GPU)
    gpu_free_gb: float | None  # measured free GPU memory (the chosen GPU)
    gpu_index: int | None
    gpu_name: str | None
    needs: Resources  # vllm: gpu_bytes is its claim on each of its GPUs
    headroom: Resources  # usable by the chosen placement (after margins), on gpu_index
    after: Resources | None  # spare beyond the margins once deployed (headroom - need)
    gb: dict[str, dict[str, float]]  # needs / headroom / after in GB, for reading
    estimate: EstimateDigest
    options: list[Option]
    reasons: list[str]
    warnings: list[str]
    service: ServiceSpec | None
    endpoints: list[str]
    steps: list[PlanStep]
    facts: FactsDigest
    policy: PolicyConfig
    flags: PlanFlags
    # The service code and lock the plan was made with (deployer.service_code); a saved plan
    # applies only with the same ones.
    code_id: str = ""
    lock_hash: str = ""
    # Whether the service will ask for an API key, and where the key comes from
    # (deployer.auth: operator | host | none | removed); set by the CLI before it shows the plan.
    auth: Literal["on", "off"] | None = None
    auth_source: str | None = None

    @property
    def can_apply(self) -> bool:
        return self.action != "refuse"

    def to_json(self) -> dict[str, object]:
        return self.model_dump(mode="json")

    def refusal_message(self) -> str:
        """One line: why nothing fits."""
        core = [r for r in self.reasons if r.startswith("refuse: ")]
        text = core[-1] if core else (self.reasons[-1] if self.reasons else "refused")
        return text.removeprefix("refuse: ").removeprefix("nothing fits; ")

    def still_holds(self, facts: HostFacts) -> list[str]:
        """What moved since the plan in a way that matters; empty: apply may go on.

        Checked: the host (boot id), the GPU (present, same model and size), Flux's and our
        unit's state, what is deployed, the target port, and that every need still fits the
        headroom measured now (with the plan's margins). Free memory that drifted but still
        fits is not reported.
        """
        if self.action == "refuse":
            return ["the plan refused: there is nothing to apply"]
        moved: list[str] = []
        was = self.facts
        now = digest_facts(facts, self.gpu_index)
        if was.boot_id and now.boot_id != was.boot_id:
            moved.append("the host rebooted since the plan (boot id changed)")
        if now.gpu_name != was.gpu_name or now.gpu_total_mib != was.gpu_total_mib:
            moved.append(
                f"GPU {self.gpu_index} was {was.gpu_name} ({was.gpu_total_mib} MiB), now "
                f"{now.gpu_name or 'absent'} ({now.gpu_total_mib} MiB)"
            )
        for unit, before, after in (
            (facts.flux.name, was.flux_state, now.flux_state),
            (facts.inference.name, was.inference_state, now.inference_state),
        ):
            if _is_up(before) != _is_up(after):
                moved.append(f"{unit} was {before}, now {after}")
        if was.deployed != now.deployed:
            moved.append(
                f"deployed model was {_deployed_text(was.deployed)}, "
                f"now {_deployed_text(now.deployed)}"
            )
        placement: Placement = "coexist" if self.action == "coexist" else "replace"
        room = headroom(facts, placement, self.policy, gpu_index=self.gpu_index)
        for what, need, have in _shortfalls(self.needs, room.usable):
            moved.append(f"{what}: needs {size_text(need)}, headroom now {size_text(have)}")
        spec = self.service.vllm if self.service else None
        pct = round(spec.gpu_memory_utilization * 100) if spec else 0
        for index in spec.gpu_indices if spec else []:
            if index == self.gpu_index:
                continue
            gpu = facts.gpu_by_index(index)
            if gpu is None:
                moved.append(f"GPU {index} (tensor parallel) is absent now")
                continue
            claim = gpu.total_bytes * pct // 100
            have = headroom(facts, placement, self.policy, gpu_index=index).usable.gpu_bytes
            if claim > have:
                moved.append(
                    f"GPU {index}: vllm claims {size_text(claim)}, headroom now {size_text(have)}"
                )
        if self.port is not None:
            conflict = port_conflict(facts, self.port, placement, self.policy)
            if conflict:
                moved.append(conflict)
        return moved


def _gb2(n: int) -> float:
    return round(n / GB, 2)


def _is_up(state: str) -> bool:
    return state in ("active", "activating", "reloading")


def _deployed_text(d: DeployedDigest | None) -> str:
    return "none" if d is None else f"{d.model} on port {d.port} ({d.quantization})"


# --------------------------------------------------------------------------- headroom


def unit_gpu_bytes(gpu: Gpu, facts: HostFacts, which: Literal["flux", "inference"]) -> int | None:
    unit = facts.flux if which == "flux" else facts.inference
    if not unit.active:
        return 0
    return gpu.used_by_pids(unit.pid_set)


def headroom(
    facts: HostFacts,
    placement: Placement,
    policy: PolicyConfig,
    *,
    gpu_index: int | None = None,
) -> Headroom:
    """Headroom of ``placement``: the best GPU (or ``gpu_index``), RAM and disk.

    coexist: free GPU + our old service's share; available RAM + its memory.
    replace: the same plus Flux's measured GPU share and memory (Flux is stopped).
    A share the driver does not attribute (no per-process data) counts as 0: never optimistic.
    """
    notes: list[str] = []
    ram_freed = facts.inference.memory_bytes if facts.inference.active else 0
    if placement == "replace" and facts.flux.active:
        ram_freed += facts.flux.memory_bytes
    best: tuple[int, int, int, Gpu] | None = None  # (raw, -index, freed, gpu)
    for gpu in facts.gpu.devices:
        if gpu_index is not None and gpu.index != gpu_index:
            continue
        freed = 0
        units: tuple[Literal["flux", "inference"], ...] = (
            ("inference", "flux") if placement == "replace" else ("inference",)
        )
        for which in units:
            share = unit_gpu_bytes(gpu, facts, which)
            if share is None:
                unit = facts.flux if which == "flux" else facts.inference
                notes.append(
                    f"GPU {gpu.index}: the driver does not say how much {unit.name} holds; "
                    "counting it as 0"
                )
                share = 0
            freed += share
        gpu_room = gpu.free_bytes + freed
        key = (gpu_room, -gpu.index, freed, gpu)
        if best is None or key[:2] > best[:2]:
            best = key
    disk_free = facts.disk.free_bytes if facts.disk else 0
    ram_raw = facts.memory.available_bytes + ram_freed
    gpu_raw = best[0] if best else 0
    raw = Resources(gpu_bytes=gpu_raw, ram_bytes=ram_raw, disk_bytes=disk_free)
    usable = Resources(
        gpu_bytes=max(gpu_raw - int(policy.gpu_margin_gb * GB), 0) if best else 0,
        ram_bytes=max(ram_raw - int(policy.ram_margin_gb * GB), 0),
        disk_bytes=max(disk_free - int(policy.disk_margin_gb * GB), 0),
    )
    return Headroom(
        placement=placement,
        gpu_index=best[3].index if best else None,
        gpu_free_bytes=best[3].free_bytes if best else 0,
        gpu_freed_bytes=best[2] if best else 0,
        ram_available_bytes=facts.memory.available_bytes,
        ram_freed_bytes=ram_freed,
        disk_free_bytes=disk_free,
        raw=raw,
        usable=usable,
        notes=notes,
    )


def port_conflict(
    facts: HostFacts, port: int, placement: Placement, policy: PolicyConfig
) -> str | None:
    """Why ``port`` cannot be used, or None. A port held by Flux (when the plan stops it) or
    by our own running service (which the deploy replaces) is free for the plan."""
    if port not in facts.listening_ports:
        return None
    if placement == "replace" and facts.flux.active and port == policy.flux_port:
        return None
    if facts.inference.active:
        if facts.deployed is not None and facts.deployed.port == port:
            return None
        if facts.deployed is None and port in (policy.coexist_port, policy.replace_port):
            return None  # ours, by every sign but the state file; re-checked at apply
    return f"port {port} is in use by a process the plan does not stop"


def _shortfalls(need: Resources, room: Resources) -> list[tuple[str, int, int]]:
    out = []
    for what, n, h in (
        ("GPU", need.gpu_bytes, room.gpu_bytes),
        ("RAM", need.ram_bytes, room.ram_bytes),
        ("disk", need.disk_bytes, room.disk_bytes),
    ):
        if n > h:
            out.append((what, n, h))
    return out


# --------------------------------------------------------------------------- digest


def digest_facts(facts: HostFacts, gpu_index: int | None) -> FactsDigest:
    gpu = facts.gpu_by_index(gpu_index) if gpu_index is not None else None
    if gpu is None and gpu_index is None and facts.gpu.devices:
        gpu = facts.gpu.devices[0]

    def share_mib(which: Literal["flux", "inference"]) -> int | None:
        if gpu is None:
            return None
        share = unit_gpu_bytes(gpu, facts, which)
        return None if share is None else share // MIB

    deployed = None
    if facts.deployed is not None:
        d = facts.deployed
        deployed = DeployedDigest(
            model=d.model, port=d.port, quantization=d.quantization, revision=d.revision
        )
    return FactsDigest(
        hostname=facts.hostname,
        boot_id=facts.boot_id,
        collected_at=facts.collected_at,
        gpu_source=facts.gpu.source,
        gpu_index=gpu.index if gpu else None,
        gpu_name=gpu.name if gpu else None,
        gpu_total_mib=gpu.memory_total_mib if gpu else None,
        gpu_free_mib=gpu.memory_free_mib if gpu else None,
        flux_gpu_mib=share_mib("flux"),
        inference_gpu_mib=share_mib("inference"),
        ram_total_bytes=facts.memory.total_bytes,
        ram_available_bytes=facts.memory.available_bytes,
        flux_state=facts.flux.active_state,
        flux_ram_bytes=facts.flux.memory_bytes if facts.flux.active else 0,
        inference_state=facts.inference.active_state,
        inference_ram_bytes=facts.inference.memory_bytes if facts.inference.active else 0,
        disk_free_bytes=facts.disk.free_bytes if facts.disk else None,
        deployed=deployed,
        listening_ports=sorted(facts.listening_ports),
    )


# --------------------------------------------------------------------------- candidates


class _Candidate(_Data):
    quantization: Quantization
    weights_model: str
    need: Need
    estimate: Estimate
    # The engine that would serve it; None: refused for the engine asked for (bitsandbytes
    # under --engine vllm), with why in engine_reason.
    engine: Engine | None = None
    engine_reason: str = ""
    vllm: VllmNeed | None = None  # vLLM's need on one GPU (engine vllm)

    @property
    def gpu_need(self) -> int:
        return self.vllm.need_bytes if self.vllm is not None else self.need.gpu_bytes

    def resources(self) -> Resources:
        if self.vllm is None:
            return _resources(self.need)
        v = self.vllm
        return Resources(gpu_bytes=v.need_bytes, ram_bytes=v.ram_bytes, disk_bytes=v.disk_bytes)


class _Placed(_Data):
    """Where a candidate fits, and what it holds there (vllm: its claim on each GPU)."""

    placement: Placement
    room: Headroom
    need: Resources
    gpu_indices: list[int]
    vllm_need: VllmNeed | None = None
    vllm_fit: VllmFit | None = None


def _resources(need: Need) -> Resources:
    return Resources(gpu_bytes=need.gpu_bytes, ram_bytes=need.ram_bytes, disk_bytes=need.disk_bytes)


def engine_request(
    spec: ModelSpec, policy: PolicyConfig, flags: PlanFlags
) -> tuple[EngineChoice, str]:
    """The engine asked for and who asked: --engine > the catalog entry (when not auto) >
    ``[policy] engine`` > auto."""
    if flags.engine is not None:
        return flags.engine, f"--engine {flags.engine}"
    if spec.engine != "auto":
        return spec.engine, f"catalog: {spec.name} has engine {spec.engine}"
    if policy.engine != "auto":
        return policy.engine, f'[policy] engine = "{policy.engine}"'
    return "auto", "auto"


def resolve_engine(
    quantization: Quantization, asked: EngineChoice, source: str
) -> tuple[Engine | None, str]:
    """The engine for one candidate and why; None when the engine asked for does not serve
    it (vLLM is never used with bitsandbytes)."""
    bnb = quantization.startswith("bnb-")
    if asked == "transformers":
        return "transformers", f"transformers: {source}"
    if asked == "vllm":
        if bnb:
            return None, (
                f"not served by vllm ({source}): {_label(quantization, '')} is quantized on "
                "load, which vLLM is not used for"
            )
        return "vllm", f"vllm: {source}"
    if bnb:
        return "transformers", (
            f"transformers: {_label(quantization, '')} is quantized on load, which vLLM is "
            f"not used for ({source})"
        )
    what = "16-bit checkpoint" if quantization == "none" else "pre-quantized AWQ checkpoint"
    return "vllm", f"vllm: {what} ({source})"


def _with_engine(cand: _Candidate, asked: EngineChoice, source: str) -> _Candidate:
    engine, why = resolve_engine(cand.quantization, asked, source)
    vneed = vm.vllm_need(cand.estimate, cand.quantization) if engine == "vllm" else None
    return cand.model_copy(update={"engine": engine, "engine_reason": why, "vllm": vneed})


def _candidates(
    spec: ModelSpec,
    catalog: Catalog,
    estimates: Mapping[str, Estimate],
    policy: PolicyConfig,
    flags: PlanFlags,
    reasons: list[str],
) -> list[_Candidate]:
    asked, source = engine_request(spec, policy, flags)
    return [
        _with_engine(c, asked, source)
        for c in _quantizations(spec, catalog, estimates, policy, flags, reasons)
    ]


def _quantizations(
    spec: ModelSpec,
    catalog: Catalog,
    estimates: Mapping[str, Estimate],
    policy: PolicyConfig,
    flags: PlanFlags,
    reasons: list[str],
) -> list[_Candidate]:
    base = estimates[spec.name]
    if spec.is_prequantized or "awq" in base.needs:
        if flags.force_quantize:
            reasons.append(
                f"--force-quantize {flags.force_quantize} ignored: {spec.name} is a "
                "pre-quantized AWQ 4-bit checkpoint"
            )
        need = base.needs["awq"]
        reasons.append(
            f"{spec.name} is pre-quantized (AWQ 4-bit): needs {size_text(need.gpu_bytes)} GPU "
            f"({need.breakdown()})"
        )
        return [_Candidate(quantization="awq", weights_model=spec.name, need=need, estimate=base)]
    out: list[_Candidate] = []
    plain = base.needs["none"]
    forced = flags.force_quantize
    plain_text = f"16-bit needs {size_text(plain.gpu_bytes)} GPU ({plain.breakdown()})"
    if forced:
        reasons.append(f"{plain_text}; --force-quantize {forced}: quantizing anyway")
    elif plain.gpu_bytes > policy.quantize_above_gb * GB:
        reasons.append(
            f"{plain_text} > quantize_above_gb {policy.quantize_above_gb:g} GB: quantizing"
        )
    else:
        reasons.append(f"{plain_text} <= quantize_above_gb {policy.quantize_above_gb:g} GB")
        out.append(
            _Candidate(quantization="none", weights_model=spec.name, need=plain, estimate=base)
        )
    variant = catalog.awq_variant_of(spec)
    if variant is not None and forced != "8bit":
        vest = estimates.get(variant.name)
        if vest is not None and vest.exists and "awq" in vest.needs:
            out.append(
                _Candidate(
                    quantization="awq",
                    weights_model=variant.name,
                    need=vest.needs["awq"],
                    estimate=vest,
                )
            )
        else:
            why = (
                "could not be checked in S3"
                if vest is None or vest.exists is None
                else ("is not in S3")
            )
            reasons.append(
                f"AWQ variant {variant.name} {why}: quantizing with bitsandbytes if needed"
            )
    if forced == "8bit":
        order: tuple[Quantization, ...] = ("bnb-8bit",)
    elif forced == "4bit" or not policy.prefer_quality:
        order = ("bnb-4bit",)
    else:
        order = ("bnb-8bit", "bnb-4bit")
    for q in order:
        out.append(
            _Candidate(quantization=q, weights_model=spec.name, need=base.needs[q], estimate=base)
        )
    return out


def _label(q: Quantization, weights_model: str) -> str:
    return {
        "none": "16-bit",
        "awq": f"AWQ 4-bit ({weights_model})",
        "bnb-4bit": "bitsandbytes 4-bit (NF4)",
        "bnb-8bit": "bitsandbytes 8-bit",
    }[q]


def _room_text(room: Headroom, policy: PolicyConfig) -> str:
    parts = [f"free {size_text(room.gpu_free_bytes)}"]
    if room.gpu_freed_bytes:
        parts.append(f"+ freed {size_text(room.gpu_freed_bytes)}")
    parts.append(f"- margin {policy.gpu_margin_gb:g} GB")
    return " ".join(parts)


def _where(placement: Placement, facts: HostFacts) -> str:
    if placement == "coexist":
        return "beside Flux"
    return "with Flux stopped" if facts.flux.active else "alone (Flux is not running)"


def _port(placement: Placement, policy: PolicyConfig) -> int:
    return policy.coexist_port if placement == "coexist" else policy.replace_port


def _place(
    cand: _Candidate,
    rooms: Mapping[Placement, Headroom],
    facts: HostFacts,
    policy: PolicyConfig,
) -> tuple[Action, str, _Placed | None]:
    label = _label(cand.quantization, cand.weights_model)
    if cand.engine is None:
        return "refuse", f"{label}: {cand.engine_reason}", None
    if cand.vllm is not None:
        return _place_vllm(cand, cand.vllm, rooms, facts, policy)
    need = _resources(cand.need)
    failures: list[str] = []
    small = cand.need.gpu_bytes <= policy.coexist_max_gb * GB
    order: list[Placement] = ["coexist", "replace"] if small else ["replace"]
    if not small:
        failures.append(
            f"not small ({size_text(cand.need.gpu_bytes)} > coexist_max_gb "
            f"{policy.coexist_max_gb:g} GB), so not beside Flux"
        )
    for placement in order:
        room = rooms[placement]
        where = _where(placement, facts)
        short = _shortfalls(need, room.usable)
        conflict = port_conflict(facts, _port(placement, policy), placement, policy)
        if not short and conflict is None:
            fits = (
                f"fits {where}: GPU {size_text(need.gpu_bytes)} <= "
                f"{size_text(room.usable.gpu_bytes)} ({_room_text(room, policy)}), "
                f"RAM {size_text(need.ram_bytes)} <= {size_text(room.usable.ram_bytes)}, "
                f"disk {size_text(need.disk_bytes)} <= {size_text(room.usable.disk_bytes)}"
            )
            placed = _Placed(
                placement=placement,
                room=room,
                need=need,
                gpu_indices=[room.gpu_index] if room.gpu_index is not None else [],
            )
            return placement, f"{label}: " + "; ".join([*failures, fits]), placed
        why = [f"{w} {size_text(n)} > {size_text(h)}" for w, n, h in short]
        if conflict:
            why.append(conflict)
        failures.append(f"does not fit {where} (" + ", ".join(why) + ")")
    return "refuse", f"{label}: " + "; ".join(failures), None


def _vllm_usable(room: Headroom, placement: Placement, policy: PolicyConfig) -> int:
    """What vLLM may claim of ``room``: its usable GPU memory, beside Flux at most
    coexist_max_gb (a small model beside Flux stays small, however much Flux leaves)."""
    usable = room.usable.gpu_bytes
    if placement == "coexist":
        usable = min(usable, int(policy.coexist_max_gb * GB))
    return usable


def _fit_text(got: VllmFit) -> str:
    return (
        f"gpu_memory_utilization {got.gpu_memory_utilization:.2f} of {size_text(got.total_bytes)}"
    )


def _place_vllm(
    cand: _Candidate,
    vneed: VllmNeed,
    rooms: Mapping[Placement, Headroom],
    facts: HostFacts,
    policy: PolicyConfig,
) -> tuple[Action, str, _Placed | None]:
    label = f"{_label(cand.quantization, cand.weights_model)} on vllm"
    failures: list[str] = []
    small = vneed.need_bytes <= policy.coexist_max_gb * GB
    order: list[Placement] = ["coexist", "replace"] if small else ["replace"]
    if not small:
        failures.append(
            f"not small ({size_text(vneed.need_bytes)} > coexist_max_gb "
            f"{policy.coexist_max_gb:g} GB), so not beside Flux"
        )
    other = Resources(gpu_bytes=0, ram_bytes=vneed.ram_bytes, disk_bytes=vneed.disk_bytes)
    gpu_short = False
    for placement in order:
        room = rooms[placement]
        where = _where(placement, facts)
        gpu = facts.gpu_by_index(room.gpu_index) if room.gpu_index is not None else None
        if gpu is None:
            failures.append(f"does not fit {where} (no GPU)")
            continue
        got = vm.fit(vneed, _vllm_usable(room, placement, policy), gpu.total_bytes)
        short = _shortfalls(other, room.usable)
        conflict = port_conflict(facts, _port(placement, policy), placement, policy)
        if got.fits and not short and conflict is None:
            fits = (
                f"fits {where}: GPU {size_text(vneed.need_bytes)} <= claim "
                f"{size_text(got.claim_bytes)} ({_fit_text(got)}; usable "
                f"{size_text(room.usable.gpu_bytes)}: {_room_text(room, policy)}), KV cache "
                f"{size_text(got.kv_cache_bytes)} ({got.kv_cache_tokens} tokens), "
                f"RAM {size_text(vneed.ram_bytes)} <= {size_text(room.usable.ram_bytes)}, "
                f"disk {size_text(vneed.disk_bytes)} <= {size_text(room.usable.disk_bytes)}"
            )
            placed = _Placed(
                placement=placement,
                room=room,
                need=Resources(
                    gpu_bytes=got.claim_bytes,
                    ram_bytes=vneed.ram_bytes,
                    disk_bytes=vneed.disk_bytes,
                ),
                gpu_indices=[gpu.index],
                vllm_need=vneed,
                vllm_fit=got,
            )
            return placement, f"{label}: " + "; ".join([*failures, fits]), placed
        why = []
        if not got.fits:
            gpu_short = gpu_short or placement == "replace"
            why.append(
                f"GPU {size_text(vneed.need_bytes)} > claim {size_text(got.claim_bytes)} "
                f"({_fit_text(got)})"
            )
        why += [f"{w} {size_text(n)} > {size_text(h)}" for w, n, h in short]
        if conflict:
            why.append(conflict)
        failures.append(f"does not fit {where} (" + ", ".join(why) + ")")
    if gpu_short and len(facts.gpu.devices) > 1:
        tp, tried = _place_tp(cand, facts, policy)
        failures += tried
        if tp is not None:
            assert tp.vllm_need is not None and tp.vllm_fit is not None
            gpus = ",".join(str(i) for i in tp.gpu_indices)
            fits = (
                f"fits with tensor parallel across GPUs {gpus}: "
                f"{size_text(tp.vllm_need.need_bytes)} <= claim "
                f"{size_text(tp.vllm_fit.claim_bytes)} on each "
                f"({_fit_text(tp.vllm_fit)}), KV cache {size_text(tp.vllm_fit.kv_cache_bytes)} "
                f"on each ({tp.vllm_fit.kv_cache_tokens} tokens)"
            )
            return "replace", f"{label}: " + "; ".join([*failures, fits]), tp
    return "refuse", f"{label}: " + "; ".join(failures), None


def _place_tp(
    cand: _Candidate, facts: HostFacts, policy: PolicyConfig
) -> tuple[_Placed | None, list[str]]:
    """Tensor parallelism, replacing Flux: the smallest tensor_parallel_size (2, 4, 8) whose
    share fits each of that many GPUs (the ones with the most usable memory, in proportion to
    their size), and why the smaller sizes did not fit."""
    sizes = vm.tp_sizes(cand.estimate, len(facts.gpu.devices))
    if not sizes:
        return None, [
            "no tensor parallel size divides its heads"
            + ("" if cand.estimate.num_attention_heads else " (shapes unknown: no config.json)")
        ]
    rooms = {
        g.index: headroom(facts, "replace", policy, gpu_index=g.index) for g in facts.gpu.devices
    }
    pcts = {
        g.index: vm.utilization_pct(rooms[g.index].usable.gpu_bytes, g.total_bytes)
        for g in facts.gpu.devices
    }
    ranked = sorted(facts.gpu.devices, key=lambda g: (-pcts[g.index], g.index))
    tried = []
    for tp in sizes:
        vneed = vm.vllm_need(cand.estimate, cand.quantization, tp)
        gpus = sorted(ranked[:tp], key=lambda g: g.index)
        pct = min(pcts[g.index] for g in gpus)
        fits = [
            vm.fit(vneed, rooms[g.index].usable.gpu_bytes, g.total_bytes, pct=pct) for g in gpus
        ]
        names = ",".join(str(g.index) for g in gpus)
        if not all(f.fits for f in fits):
            worst = min(fits, key=lambda f: f.claim_bytes)
            tried.append(
                f"tensor parallel {tp} (GPUs {names}): {size_text(vneed.need_bytes)} on each > "
                f"claim {size_text(worst.claim_bytes)} ({_fit_text(worst)})"
            )
            continue
        first = rooms[gpus[0].index]
        other = Resources(gpu_bytes=0, ram_bytes=vneed.ram_bytes, disk_bytes=vneed.disk_bytes)
        short = _shortfalls(other, first.usable)
        conflict = port_conflict(facts, policy.replace_port, "replace", policy)
        if short or conflict:
            why = [f"{w} {size_text(n)} > {size_text(h)}" for w, n, h in short]
            tried.append(
                f"tensor parallel {tp} (GPUs {names}): "
                + ", ".join([*why, *filter(None, [conflict])])
            )
            break
        least = min(fits, key=lambda f: f.kv_cache_bytes)
        placed = _Placed(
            placement="replace",
            room=first,
            need=Resources(
                gpu_bytes=fits[0].claim_bytes,
                ram_bytes=vneed.ram_bytes,
                disk_bytes=vneed.disk_bytes,
            ),
            gpu_indices=[g.index for g in gpus],
            vllm_need=vneed,
            vllm_fit=least,
        )
        return placed, tried
    return None, tried


# --------------------------------------------------------------------------- plan


def plan_deployment(
    spec: ModelSpec,
    catalog: Catalog,
    estimates: Mapping[str, Estimate],
    facts: HostFacts,
    settings: Settings,
    flags: PlanFlags | None = None,
) -> Plan:
    """The plan for ``spec`` on the host ``facts`` describe (rules in the module doc).

    ``estimates`` holds the model's estimate and, when the catalog names one, its AWQ
    variant's (present only when the variant was looked for in S3).
    """
    flags = flags or PlanFlags()
    policy = settings.policy
    reasons: list[str] = []
    warnings: list[str] = [f"probe: {e}" for e in facts.errors]
    if facts.deployed_error:
        warnings.append(f"state file: {facts.deployed_error}")
    base = estimates[spec.name]
    reasons.append(base.describe())
    for note in base.notes:
        warnings.append(note)
    if base.source == "catalog":
        warnings.append(f"estimate for {spec.name} is from the catalog's figures, not metadata")

    rooms: dict[Placement, Headroom] = {
        p: headroom(facts, p, policy) for p in ("coexist", "replace")
    }
    for note in dict.fromkeys(rooms["replace"].notes):
        warnings.append(note)

    candidates = _candidates(spec, catalog, estimates, policy, flags, reasons)
    served = [c for c in candidates if c.engine is not None]
    options: list[Option] = []
    chosen: tuple[_Candidate, _Placed] | None = None
    if not facts.gpu.devices:
        reasons.append(
            "refuse: no GPU on the host ("
            + (facts.gpu.error or "the driver lists none")
            + "); CPU-only serving is not planned"
        )
    else:
        for cand in candidates:
            placement, verdict, placed = _place(cand, rooms, facts, policy)
            options.append(
                Option(
                    quantization=cand.quantization,
                    weights_model=cand.weights_model,
                    need=placed.need if placed else cand.resources(),
                    placement=placement,
                    verdict=verdict,
                )
            )
            reasons.append(verdict)
            if placement != "refuse" and placed is not None:
                chosen = (cand, placed)
                break
        if chosen is None:
            asked = engine_request(spec, policy, flags)[1]
            reasons.append(_refusal(served, rooms["replace"], facts, asked))
    if chosen is None:
        pick = min(served or candidates, key=lambda c: c.gpu_need)
        room = rooms["replace"]
        refused = _Placed(
            placement="replace",
            room=room,
            need=pick.resources(),
            gpu_indices=[room.gpu_index] if room.gpu_index is not None else [],
            vllm_need=pick.vllm,
        )
        return _finish(
            spec,
            catalog,
            settings,
            flags,
            facts,
            "refuse",
            pick,
            refused,
            options,
            reasons,
            warnings,
        )
    cand, placed = chosen
    return _finish(
        spec,
        catalog,
        settings,
        flags,
        facts,
        placed.placement,
        cand,
        placed,
        options,
        reasons,
        warnings,
    )


def _refusal(served: list[_Candidate], room: Headroom, facts: HostFacts, asked: str) -> str:
    """The last reason of a plan that refuses: what the smallest option needs, against the
    most the host offers (``asked``: who asked for the engine)."""
    if not served:
        return (
            f"refuse: nothing fits; {asked}: every option is bitsandbytes, quantized on load, "
            "which vLLM is not used for (--engine transformers serves it)"
        )
    smallest = min(served, key=lambda c: c.gpu_need)
    gpu = facts.gpu_by_index(room.gpu_index) if room.gpu_index is not None else None
    if smallest.vllm is not None and gpu is not None:
        got = vm.fit(smallest.vllm, room.usable.gpu_bytes, gpu.total_bytes)
        other = Resources(
            gpu_bytes=0, ram_bytes=smallest.vllm.ram_bytes, disk_bytes=smallest.vllm.disk_bytes
        )
        del other
        if not got.fits:
            return "refuse: nothing fits; " + vm.fit_text(smallest.vllm, got, f"GPU {gpu.index}")
    need = smallest.resources()
    return (
        f"refuse: nothing fits; the smallest option, "
        f"{_label(smallest.quantization, smallest.weights_model)}"
        + (" on vllm" if smallest.vllm is not None else "")
        + f", needs {size_text(need.gpu_bytes)} GPU / {size_text(need.ram_bytes)} "
        f"RAM / {size_text(need.disk_bytes)} disk; the most the host offers "
        f"(Flux stopped) is {size_text(room.usable.gpu_bytes)} / "
        f"{size_text(room.usable.ram_bytes)} / {size_text(room.usable.disk_bytes)}"
    )


def _finish(
    spec: ModelSpec,
    catalog: Catalog,
    settings: Settings,
    flags: PlanFlags,
    facts: HostFacts,
    action: Action,
    cand: _Candidate,
    placed: _Placed,
    options: list[Option],
    reasons: list[str],
    warnings: list[str],
) -> Plan:
    policy = settings.policy
    remote = settings.remote
    room = placed.room
    bucket = settings.s3.bucket or catalog.bucket
    weights_spec = catalog.models[cand.weights_model]
    need = placed.need
    applies = action != "refuse"
    stop_flux = action == "replace" and facts.flux.active
    engine: Engine = cand.engine or "vllm"  # None: refused for an explicit vllm
    engine_reason = cand.engine_reason
    if cand.engine is None:
        engine_reason = f"vllm: {engine_request(spec, policy, flags)[1]}"
    port = None
    if action == "coexist":
        port = policy.coexist_port
    elif action == "replace":
        port = policy.replace_port
    vneed, vfit = placed.vllm_need, placed.vllm_fit
    if applies and vneed is not None and vneed.tensor_parallel_size > 1:
        gpus = ",".join(str(i) for i in placed.gpu_indices)
        single = vm.vllm_need(cand.estimate, cand.quantization)
        reasons.append(
            f"vllm: tensor parallel across GPUs {gpus} (fits no single GPU: needs "
            f"{size_text(single.need_bytes)} on one; {size_text(vneed.need_bytes)} on each of "
            f"{vneed.tensor_parallel_size})"
        )
    if applies and not facts.flux.active and facts.flux.exists:
        reasons.append(
            f"{facts.flux.name} is {facts.flux.active_state}: left as it is "
            f"(start it by hand: sudo systemctl start {facts.flux.name})"
        )
    if stop_flux:
        freed = rooms_freed_text(facts, room)
        reasons.append(f"stops {facts.flux.name} ({freed}); port {port}")
    elif action == "coexist":
        reasons.append(
            f"{facts.flux.name} keeps running" if facts.flux.active else "Flux is not running"
        )
    after = None
    if applies:
        # What stays spare beyond the safety margins: the same footing as the headroom, so
        # spare = headroom - need, and the margins stay free on top.
        after = Resources(
            gpu_bytes=room.usable.gpu_bytes - need.gpu_bytes,
            ram_bytes=room.usable.ram_bytes - need.ram_bytes,
            disk_bytes=room.usable.disk_bytes - need.disk_bytes,
        )
    gpu = facts.gpu_by_index(room.gpu_index) if room.gpu_index is not None else None
    if applies:
        memory_max = _size_bytes(settings.service.memory_max)
        if memory_max is not None and need.ram_bytes > memory_max:
            warnings.append(
                f"loading may need {size_text(need.ram_bytes)} RAM, above the unit's "
                f"MemoryMax={settings.service.memory_max}"
            )
    weights_uri = f"s3://{bucket}/{weights_spec.s3_prefix}"
    weights_dir = f"{remote.models_dir}/{weights_spec.name}"
    if weights_spec.revision:
        weights_dir += f"/{weights_spec.revision}"
    stored = cand.estimate.stored_dtype
    service = None
    if applies and port is not None and room.gpu_index is not None:
        vllm = None
        if vneed is not None and vfit is not None:
            vllm = VllmSpec(
                package=settings.install.vllm_package,
                gpu_memory_utilization=vfit.gpu_memory_utilization,
                max_model_len=vneed.max_model_len,
                max_num_seqs=vneed.max_num_seqs,
                tensor_parallel_size=vneed.tensor_parallel_size,
                kv_least_bytes=vneed.kv_least_bytes,
                gpu_indices=placed.gpu_indices,
                kv_cache_bytes=vfit.kv_cache_bytes,
                tool_call_parser=weights_spec.tool_call_parser or spec.tool_call_parser,
            )
        service = ServiceSpec(
            unit=remote.service_name,
            port=port,
            gpu_index=room.gpu_index,
            weights_model=weights_spec.name,
            weights_uri=weights_uri,
            weights_dir=weights_dir,
            install_dir=remote.service_dir,
            quantization=cand.quantization,
            torch_dtype="float16" if stored == "F16" or cand.quantization == "awq" else "bfloat16",
            max_context_tokens=cand.estimate.context_tokens,
            max_concurrent_seqs=cand.estimate.concurrent_seqs,
            memory_max=settings.service.memory_max,
            cpu_quota=settings.service.cpu_quota,
            engine=engine,
            vllm=vllm,
        )
    host = settings.host.address or facts.hostname
    endpoints = [f"http://{host}:{port}{p}" for p in ENDPOINT_PATHS] if port else []
    est = cand.estimate
    terms = cand.need if vneed is None else vneed
    digest = EstimateDigest(
        source=est.source,
        exact=est.exact,
        parameters=est.parameters,
        stored_dtype=est.stored_dtype,
        context_tokens=est.context_tokens,
        concurrent_seqs=est.concurrent_seqs,
        weights_bytes=terms.weights_bytes,
        kv_cache_bytes=(
            cand.need.kv_cache_bytes
            if vneed is None
            else vfit.kv_cache_bytes
            if vfit
            else vneed.kv_least_bytes
        ),
        activation_bytes=terms.activation_bytes,
        runtime_bytes=terms.runtime_bytes,
        cuda_graph_bytes=vneed.cuda_graph_bytes if vneed else 0,
        kv_cache_tokens=vfit.kv_cache_tokens if vneed and vfit else None,
    )
    plan = Plan(
        model=spec.name,
        revision=spec.revision,
        target=settings.host.address,
        action=action,
        stop_flux=stop_flux,
        port=port,
        quantization=cand.quantization,
        weights_model=cand.weights_model,
        engine=engine,
        engine_reason=engine_reason,
        need_gb=_gb2(need.gpu_bytes),
        gpu_free_gb=_gb2(gpu.free_bytes) if gpu else None,
        gpu_index=room.gpu_index,
        gpu_name=gpu.name if gpu else None,
        needs=need,
        headroom=room.usable,
        after=after,
        gb={"needs": need.gb(), "headroom": room.usable.gb()}
        | ({"after": after.gb()} if after else {}),
        estimate=digest,
        options=options,
        reasons=reasons,
        warnings=list(dict.fromkeys(warnings)),
        service=service,
        endpoints=endpoints,
        steps=_steps(spec, settings, facts, service, stop_flux, need) if service else [],
        facts=digest_facts(facts, room.gpu_index),
        policy=policy,
        flags=flags,
    )
    return plan.model_copy(update={"plan_id": plan_id(plan)})


# What the plan decides, and what it is decided for: the id is a hash of these only, so a plan
# made again on a host whose free memory drifted (or a minute later) has the same id as long as
# it decides the same. Measurements (facts, headroom, gb) and the prose are left out.
DECIDING = (
    "model",
    "revision",
    "target",
    "action",
    "stop_flux",
    "port",
    "quantization",
    "weights_model",
    "engine",
    "gpu_index",
    "gpu_name",
    "service",
    "steps",
    "policy",
    "flags",
    "code_id",
    "lock_hash",
    "auth",
    "auth_source",
)


def plan_id(plan: Plan) -> str:
    """A short hash of what the plan decides: the same decisions give the same id."""
    data = plan.model_dump(mode="json", include=set(DECIDING))
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def with_code(plan: Plan, code_id: str, lock_hash: str) -> Plan:
    """``plan`` stamped with the code and lock it would deploy, its id recomputed."""
    stamped = plan.model_copy(update={"code_id": code_id, "lock_hash": lock_hash})
    return stamped.model_copy(update={"plan_id": plan_id(stamped)})


def with_auth(plan: Plan, auth: Literal["on", "off"], source: str) -> Plan:
    """``plan`` with its auth decision, its id recomputed."""
    stamped = plan.model_copy(update={"auth": auth, "auth_source": source})
    return stamped.model_copy(update={"plan_id": plan_id(stamped)})


def decision_changes(saved: Plan, fresh: Plan) -> list[str]:
    """The deciding fields in which ``fresh`` differs from ``saved``, one line each."""
    a, b = saved.model_dump(mode="json"), fresh.model_dump(mode="json")
    out = []
    for key in DECIDING:
        if a.get(key) != b.get(key):
            before, after = json.dumps(a.get(key))[:120], json.dumps(b.get(key))[:120]
            out.append(f"{key}: {before} in the plan, {after} now")
    return out


def rooms_freed_text(facts: HostFacts, room: Headroom) -> str:
    flux_ram = facts.flux.memory_bytes
    gpu = facts.gpu_by_index(room.gpu_index) if room.gpu_index is not None else None
    flux_gpu = unit_gpu_bytes(gpu, facts, "flux") if gpu else None
    gpu_text = "unknown GPU" if flux_gpu is None else f"{size_text(flux_gpu)} GPU"
    return f"frees {gpu_text} and {size_text(flux_ram)} RAM"


def _size_bytes(text: str) -> int | None:
    if text == "infinity":
        return None
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    number = text.rstrip("KMGT")
    return int(number) * units[text[len(number) :]]


def _steps(
    spec: ModelSpec,
    settings: Settings,
    facts: HostFacts,
    service: ServiceSpec,
    stop_flux: bool,
    need: Resources,
) -> list[PlanStep]:
    remote = settings.remote
    port = service.port
    if service.vllm is not None:
        backend = "engine vllm: the service's API in front of vLLM"
    else:
        backend = (
            "engine transformers"
            + {
                "none": "",
                "awq": " + AWQ kernels",
                "bnb-4bit": " + bitsandbytes",
                "bnb-8bit": " + bitsandbytes",
            }[service.quantization]
        )
    steps = [
        PlanStep(name="lock", description=f"take the host's deploy lock under {remote.state_dir}"),
        PlanStep(
            name="re-inspect",
            description="probe the host again; stop if the plan no longer holds (Plan.still_holds)",
        ),
        PlanStep(
            name="install-venv",
            description=f"prepare the service virtualenv in {remote.service_dir} ({backend})",
        ),
    ]
    if service.vllm is not None:
        package = service.vllm.package
        steps.append(
            PlanStep(
                name="install-engine",
                description=f"prepare the vLLM virtualenv ({package}, from the lock) in "
                f"{remote.service_dir}/engines",
                params={"package": package},
            )
        )
    steps += [
        PlanStep(
            name="pull-weights",
            description=f"the host downloads {service.weights_uri} "
            f"({size_text(need.disk_bytes)}) to {service.weights_dir}",
            params={"source": service.weights_uri, "target": service.weights_dir},
        ),
    ]
    bootstrap = spec.bootstrap
    if bootstrap is not None and bootstrap.step == "after-pull":
        steps.append(_bootstrap_step(bootstrap.script, bootstrap.step))
    gpus = str(service.gpu_index)
    engine: str = service.engine
    if service.vllm is not None:
        gpus = ",".join(str(i) for i in service.vllm.gpu_indices)
        engine += f" at gpu_memory_utilization {service.vllm.gpu_memory_utilization:.2f}"
    steps.append(
        PlanStep(
            name="render-unit",
            description=f"write {service.unit} (port {port}, GPU {gpus}, "
            f"{service.quantization}, engine {engine}, MemoryMax={service.memory_max}, "
            f"CPUQuota={service.cpu_quota}) and reload systemd",
            params={"unit": service.unit, "port": port},
        )
    )
    if bootstrap is not None and bootstrap.step == "before-start":
        # Before Flux is stopped: a hook that fails leaves Flux running.
        steps.append(_bootstrap_step(bootstrap.script, bootstrap.step))
    if stop_flux:
        steps.append(
            PlanStep(
                name="stop-flux",
                description=f"stop {facts.flux.name} to free port {port} and its memory "
                f"(undo: start it again)",
                params={"unit": facts.flux.name},
            )
        )
    replacing = ""
    if facts.inference.active:
        old = facts.deployed.model if facts.deployed else "the running model"
        replacing = f", replacing {old}"
    timeout_s = settings.service.health_timeout_s
    steps += [
        PlanStep(
            name="start",
            description=f"start {service.unit}{replacing}",
            params={"unit": service.unit},
        ),
        PlanStep(
            name="wait-healthy",
            description=f"wait until http://127.0.0.1:{port}/health is ok and /status names "
            f"{spec.name} (timeout {timeout_s:g}s)",
            params={"port": port, "model": spec.name, "timeout_s": timeout_s},
        ),
    ]
    if bootstrap is not None and bootstrap.step == "after-start":
        steps.append(_bootstrap_step(bootstrap.script, bootstrap.step))
    steps += [
        PlanStep(
            name="write-discovery-env",
            description=f"publish the endpoint for discovery (ASOBA_INFERENCE_PORT={port}, "
            f"MISTRAL_STATUS_URL=http://localhost:{port}/status)",
            params={"port": port},
        ),
        PlanStep(
            name="audit",
            description=f"record {remote.state_dir}/current.json and append to the audit log",
        ),
    ]
    return steps


def _bootstrap_step(script: str, when: str) -> PlanStep:
    return PlanStep(
        name="bootstrap",
        description=f"run {script} on the host ({when})",
        params={"script": script, "when": when},
    )


# Field order of the JSON the CLI prints: the required keys first.
JSON_HEAD = (
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
    "engine",
    "engine_reason",
)


def plan_json(plan: Plan) -> dict[str, object]:
    data = plan.to_json()
    head = {k: data.pop(k) for k in JSON_HEAD}
    return {**head, **data}


__all__ = [
    "Action",
    "FactsDigest",
    "Headroom",
    "Option",
    "Plan",
    "PlanFlags",
    "PlanStep",
    "Resources",
    "ServiceSpec",
    "VllmSpec",
    "decision_changes",
    "digest_facts",
    "engine_request",
    "headroom",
    "plan_deployment",
    "plan_json",
    "port_conflict",
    "resolve_engine",
    "with_auth",
    "with_code",
]
