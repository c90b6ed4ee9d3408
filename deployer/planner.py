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

from .catalog import Catalog, ModelSpec
from .config import PolicyConfig, Settings
from .estimate import GB, Estimate, Need, Quantization, size_text
from .facts import MIB, Gpu, HostFacts

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
    kv_cache_bytes: int
    activation_bytes: int
    runtime_bytes: int


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
    need_gb: float  # GPU need of the chosen option
    gpu_free_gb: float | None  # measured free GPU memory (the chosen GPU)
    gpu_index: int | None
    gpu_name: str | None
    needs: Resources
    headroom: Resources  # usable by the chosen placement (after margins)
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


def _resources(need: Need) -> Resources:
    return Resources(gpu_bytes=need.gpu_bytes, ram_bytes=need.ram_bytes, disk_bytes=need.disk_bytes)


def _candidates(
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


def _place(
    cand: _Candidate,
    rooms: Mapping[Placement, Headroom],
    facts: HostFacts,
    policy: PolicyConfig,
) -> tuple[Action, str, Headroom | None]:
    need = _resources(cand.need)
    label = _label(cand.quantization, cand.weights_model)
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
        port = policy.coexist_port if placement == "coexist" else policy.replace_port
        where = (
            "beside Flux"
            if placement == "coexist"
            else ("with Flux stopped" if facts.flux.active else "alone (Flux is not running)")
        )
        short = _shortfalls(need, room.usable)
        conflict = port_conflict(facts, port, placement, policy)
        if not short and conflict is None:
            fits = (
                f"fits {where}: GPU {size_text(need.gpu_bytes)} <= "
                f"{size_text(room.usable.gpu_bytes)} ({_room_text(room, policy)}), "
                f"RAM {size_text(need.ram_bytes)} <= {size_text(room.usable.ram_bytes)}, "
                f"disk {size_text(need.disk_bytes)} <= {size_text(room.usable.disk_bytes)}"
            )
            return placement, f"{label}: " + "; ".join([*failures, fits]), room
        why = [f"{w} {size_text(n)} > {size_text(h)}" for w, n, h in short]
        if conflict:
            why.append(conflict)
        failures.append(f"does not fit {where} (" + ", ".join(why) + ")")
    return "refuse", f"{label}: " + "; ".join(failures), None


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
    options: list[Option] = []
    chosen: tuple[_Candidate, Placement, Headroom] | None = None
    if not facts.gpu.devices:
        reasons.append(
            "refuse: no GPU on the host ("
            + (facts.gpu.error or "the driver lists none")
            + "); CPU-only serving is not planned"
        )
    else:
        for cand in candidates:
            placement, verdict, room = _place(cand, rooms, facts, policy)
            options.append(
                Option(
                    quantization=cand.quantization,
                    weights_model=cand.weights_model,
                    need=_resources(cand.need),
                    placement=placement,
                    verdict=verdict,
                )
            )
            reasons.append(verdict)
            if placement != "refuse" and room is not None:
                chosen = (cand, placement, room)
                break
        if chosen is None:
            smallest = min(candidates, key=lambda c: c.need.gpu_bytes)
            room = rooms["replace"]
            reasons.append(
                f"refuse: nothing fits; the smallest option, "
                f"{_label(smallest.quantization, smallest.weights_model)}, needs "
                f"{size_text(smallest.need.gpu_bytes)} GPU / {size_text(smallest.need.ram_bytes)} "
                f"RAM / {size_text(smallest.need.disk_bytes)} disk; the most the host offers "
                f"(Flux stopped) is {size_text(room.usable.gpu_bytes)} / "
                f"{size_text(room.usable.ram_bytes)} / {size_text(room.usable.disk_bytes)}"
            )
    if chosen is None:
        pick = min(candidates, key=lambda c: c.need.gpu_bytes)
        room = rooms["replace"]
        return _finish(
            spec, catalog, settings, flags, facts, "refuse", pick, room, options, reasons, warnings
        )
    cand, placement, room = chosen
    return _finish(
        spec, catalog, settings, flags, facts, placement, cand, room, options, reasons, warnings
    )


def _finish(
    spec: ModelSpec,
    catalog: Catalog,
    settings: Settings,
    flags: PlanFlags,
    facts: HostFacts,
    action: Action,
    cand: _Candidate,
    room: Headroom,
    options: list[Option],
    reasons: list[str],
    warnings: list[str],
) -> Plan:
    policy = settings.policy
    remote = settings.remote
    bucket = settings.s3.bucket or catalog.bucket
    weights_spec = catalog.models[cand.weights_model]
    need = _resources(cand.need)
    applies = action != "refuse"
    stop_flux = action == "replace" and facts.flux.active
    port = None
    if action == "coexist":
        port = policy.coexist_port
    elif action == "replace":
        port = policy.replace_port
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
        )
    host = settings.host.address or facts.hostname
    endpoints = [f"http://{host}:{port}{p}" for p in ENDPOINT_PATHS] if port else []
    est = cand.estimate
    plan = Plan(
        model=spec.name,
        revision=spec.revision,
        target=settings.host.address,
        action=action,
        stop_flux=stop_flux,
        port=port,
        quantization=cand.quantization,
        weights_model=cand.weights_model,
        need_gb=_gb2(need.gpu_bytes),
        gpu_free_gb=_gb2(gpu.free_bytes) if gpu else None,
        gpu_index=room.gpu_index,
        gpu_name=gpu.name if gpu else None,
        needs=need,
        headroom=room.usable,
        after=after,
        gb={"needs": need.gb(), "headroom": room.usable.gb()}
        | ({"after": after.gb()} if after else {}),
        estimate=EstimateDigest(
            source=est.source,
            exact=est.exact,
            parameters=est.parameters,
            stored_dtype=est.stored_dtype,
            context_tokens=est.context_tokens,
            concurrent_seqs=est.concurrent_seqs,
            weights_bytes=cand.need.weights_bytes,
            kv_cache_bytes=cand.need.kv_cache_bytes,
            activation_bytes=cand.need.activation_bytes,
            runtime_bytes=cand.need.runtime_bytes,
        ),
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
    backend = {
        "none": "transformers",
        "awq": "transformers + AWQ kernels",
        "bnb-4bit": "transformers + bitsandbytes",
        "bnb-8bit": "transformers + bitsandbytes",
    }[service.quantization]
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
    steps.append(
        PlanStep(
            name="render-unit",
            description=f"write {service.unit} (port {port}, GPU {service.gpu_index}, "
            f"{service.quantization}, MemoryMax={service.memory_max}, "
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
    "decision_changes",
    "digest_facts",
    "headroom",
    "plan_deployment",
    "plan_json",
    "port_conflict",
    "with_auth",
    "with_code",
]
