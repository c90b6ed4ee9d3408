"""Showing a plan: a Rich rendering for people, JSON for programs, the catalog as a table.

Nothing here decides anything; everything shown comes from the ``Plan``. Text that reaches
the terminal goes through ``redact`` first, so a credential that slipped into an error message
(an S3 endpoint's answer, say) never prints.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .estimate import count_text, size_text
from .planner import Plan
from .planner import plan_json as plan_json  # the plan's JSON, shown by the CLIs from here
from .redact import Redactor

if TYPE_CHECKING:
    from rich.console import Console

    from .catalog import Catalog

SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSPHRASE|CREDENTIAL|PRIVATE)", re.I)
MIN_SECRET_LEN = 6


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking variables in the environment (AWS_SECRET_ACCESS_KEY, ...)."""
    environ = os.environ if environ is None else environ
    return [v for k, v in environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN]


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` without those values or anything credential-shaped (``deployer.redact``)."""
    return Redactor(secret_values(environ)).text(text)


def plan_to_json_text(plan: Plan) -> str:
    return redact(json.dumps(plan_json(plan), indent=2))


def _gb(n: int | None) -> str:
    return "?" if n is None else size_text(n)


ACTION_STYLE = {"coexist": "bold green", "replace": "bold yellow", "refuse": "bold red"}
QUANT_TEXT = {
    "none": "none (16-bit)",
    "awq": "AWQ 4-bit, pre-quantized",
    "bnb-4bit": "bitsandbytes 4-bit (NF4)",
    "bnb-8bit": "bitsandbytes 8-bit",
}


def render_plan(plan: Plan, console: Console, *, dry_run: bool = True) -> None:
    from rich.table import Table
    from rich.text import Text

    title = Text(f"Plan for {plan.model}", style="bold")
    if plan.target:
        title.append(f" on {plan.target}", style="bold")
    title.append(f"  [{plan.plan_id}]", style="dim")
    console.print(title)

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    action = Text(plan.action.upper(), style=ACTION_STYLE[plan.action])
    if plan.action == "coexist":
        action.append(" beside Flux")
    elif plan.action == "replace":
        action.append(" (stops flux-api)" if plan.stop_flux else " (Flux not running)")
    head.add_row("action", action)
    if plan.stop_flux:
        flux = Text("will be STOPPED", style="bold yellow")
    elif plan.facts.flux_state in ("active", "activating", "reloading"):
        flux = Text("keeps running")
    else:
        flux = Text(f"{plan.facts.flux_state} (left as it is)")
    head.add_row("flux", flux)
    head.add_row("port", str(plan.port) if plan.port else "-")
    quant = QUANT_TEXT[plan.quantization]
    if plan.weights_model != plan.model:
        quant += f" from {plan.weights_model}"
    if plan.action == "refuse":
        quant = f"(smallest option) {quant}"
    head.add_row("quantization", quant)
    engine = Text(plan.engine, style="bold")
    engine.append(f"  {plan.engine_reason}", style="dim")
    head.add_row("engine", engine)
    vllm = plan.service.vllm if plan.service else None
    if vllm is not None:
        parser = vllm.tool_call_parser
        head.add_row("tool calls", f"{parser} parser" if parser else "off (no tool_call_parser)")
    if plan.gpu_name is not None:
        if vllm is not None and vllm.tensor_parallel_size > 1:
            gpus = ",".join(str(i) for i in vllm.gpu_indices)
            head.add_row(
                "GPU",
                f"{gpus}: {plan.gpu_name} (tensor parallel {vllm.tensor_parallel_size})",
            )
        else:
            head.add_row("GPU", f"{plan.gpu_index}: {plan.gpu_name}")
    est = plan.estimate
    source = "S3 metadata" if est.source == "s3" else "catalog figures (approximate)"
    head.add_row(
        "estimate",
        f"{count_text(est.parameters)} parameters, stored {est.stored_dtype}, from {source}; "
        f"{est.context_tokens} tokens x {est.concurrent_seqs} sequences",
    )
    console.print(head)

    table = Table(title="Memory", title_justify="left", show_edge=False)
    table.add_column("")
    table.add_column("need", justify="right")
    table.add_column("headroom", justify="right")
    table.add_column("spare after deploy", justify="right")
    after = plan.after
    for label, need, room, left in (
        ("GPU", plan.needs.gpu_bytes, plan.headroom.gpu_bytes, after.gpu_bytes if after else None),
        ("RAM", plan.needs.ram_bytes, plan.headroom.ram_bytes, after.ram_bytes if after else None),
        (
            "disk",
            plan.needs.disk_bytes,
            plan.headroom.disk_bytes,
            after.disk_bytes if after else None,
        ),
    ):
        style = "red" if need > room else ""
        table.add_row(label, Text(_gb(need), style=style), _gb(room), _gb(left))
    console.print(table)
    if plan.engine == "vllm":
        _vllm_table(plan, console)
        console.print(Text(_vllm_memory_text(plan), style="dim"))
    else:
        _transformers_memory_note(plan, console)
    if len(plan.options) > 1 or plan.action == "refuse":
        options = Table(title="Options considered", title_justify="left", show_edge=False)
        options.add_column("quantization")
        options.add_column("GPU need", justify="right")
        options.add_column("result")
        for option in plan.options:
            options.add_row(
                QUANT_TEXT[option.quantization]
                + (f" ({option.weights_model})" if option.weights_model != plan.model else ""),
                _gb(option.need.gpu_bytes),
                Text(option.placement, style=ACTION_STYLE[option.placement]),
            )
        console.print(options)

    def bullets(title: str, items: list[str], style: str = "", mark: str = "-") -> None:
        if not items:
            return
        console.print(Text(title, style=f"bold {style}".strip()))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=3, justify="right")
        grid.add_column(ratio=1)
        for item in items:
            grid.add_row(mark, Text(redact(item), style=style))
        console.print(grid)

    bullets("Why", plan.reasons)
    bullets("Warnings", plan.warnings, "yellow", "!")
    bullets("Endpoints", plan.endpoints)
    if plan.steps:
        console.print(Text("Steps apply would run" if dry_run else "Steps", style="bold"))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=3, justify="right")
        grid.add_column(style="cyan", no_wrap=True)
        grid.add_column(ratio=1)
        for number, step in enumerate(plan.steps, 1):
            grid.add_row(f"{number}.", step.name, redact(step.description))
        console.print(grid)
    if dry_run:
        console.print(Text("dry run: nothing was changed on the host", style="dim"))


def _vllm_table(plan: Plan, console: Console) -> None:
    """vLLM's terms: what fills its claim of gpu_memory_utilization x the GPU's memory."""
    from rich.table import Table

    est = plan.estimate
    vllm = plan.service.vllm if plan.service else None
    each = " on each GPU" if vllm is not None and vllm.tensor_parallel_size > 1 else ""
    table = Table(title=f"vLLM GPU memory{each}", title_justify="left", show_edge=False)
    table.add_column("")
    table.add_column("size", justify="right")
    kv_label = "KV cache (the rest)" if vllm is not None else "KV cache (at least)"
    for label, size in (
        ("weights", est.weights_bytes),
        ("activations (profile prefill)", est.activation_bytes),
        ("CUDA graphs", est.cuda_graph_bytes),
        ("runtime", est.runtime_bytes),
        (kv_label, est.kv_cache_bytes),
    ):
        table.add_row(label, _gb(size))
    if vllm is not None:
        table.add_row(
            f"claim: gpu_memory_utilization {vllm.gpu_memory_utilization:.2f}",
            _gb(plan.needs.gpu_bytes),
        )
    else:
        table.add_row("need", _gb(plan.needs.gpu_bytes))
    console.print(table)


def _vllm_memory_text(plan: Plan) -> str:
    est = plan.estimate
    vllm = plan.service.vllm if plan.service else None
    terms = (
        f"weights {_gb(est.weights_bytes)} + activations {_gb(est.activation_bytes)} (profile "
        f"prefill) + CUDA graphs {_gb(est.cuda_graph_bytes)} + runtime {_gb(est.runtime_bytes)}"
    )
    margins = (
        f"headroom and spare are after the safety margins (GPU {plan.policy.gpu_margin_gb:g} GB,"
        f" RAM {plan.policy.ram_margin_gb:g} GB, disk {plan.policy.disk_margin_gb:g} GB)"
    )
    if vllm is None:
        return (
            f"  vllm GPU need = {terms} + KV cache {_gb(est.kv_cache_bytes)} for "
            f"{est.concurrent_seqs} x {est.context_tokens} tokens; {margins}"
        )
    each = " on each GPU" if vllm.tensor_parallel_size > 1 else ""
    tokens = f", {est.kv_cache_tokens} tokens" if est.kv_cache_tokens is not None else ""
    return (
        f"  vllm claims gpu_memory_utilization {vllm.gpu_memory_utilization:.2f} x the GPU's "
        f"total = {_gb(plan.needs.gpu_bytes)}{each}: {terms} + KV cache "
        f"{_gb(vllm.kv_cache_bytes)} (all the rest{tokens}; at least {est.concurrent_seqs} x "
        f"{vllm.max_model_len} tokens); {margins}, so spare = headroom - claim"
    )


def _transformers_memory_note(plan: Plan, console: Console) -> None:
    from rich.text import Text

    est = plan.estimate
    console.print(
        Text(
            f"  GPU need = weights {_gb(est.weights_bytes)} + KV cache {_gb(est.kv_cache_bytes)}"
            f" + activations {_gb(est.activation_bytes)} + runtime {_gb(est.runtime_bytes)}; "
            "headroom and spare are both after the safety margins (GPU "
            f"{plan.policy.gpu_margin_gb:g} GB, RAM {plan.policy.ram_margin_gb:g} GB, disk "
            f"{plan.policy.disk_margin_gb:g} GB kept free besides), so spare = headroom - need",
            style="dim",
        )
    )


def render_catalog(catalog: Catalog, console: Console) -> None:
    from rich import box
    from rich.table import Table

    wide = console.width >= 110
    table = Table(
        title=f"Catalog ({catalog.source}, bucket {catalog.bucket})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    table.add_column("model", no_wrap=True)
    table.add_column("tier", no_wrap=True)
    table.add_column("weights", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("AWQ", no_wrap=True)
    if wide:
        table.add_column("context", justify="right", no_wrap=True)
        table.add_column("description", ratio=1)
    for name, spec in sorted(catalog.models.items()):
        row = [
            name,
            spec.tier.value,
            "awq int4" if spec.is_prequantized else spec.precision.value,
            f"{spec.parameters_b:g}B",
            f"{spec.size_gb:g} GB",
            spec.awq_variant or "",
        ]
        if wide:
            row += [str(spec.context_length), spec.description]
        table.add_row(*row)
    console.print(table)
