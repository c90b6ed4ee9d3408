"""How apply and the operations show themselves in a terminal (Rich) or as JSON."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from .apply import ApplyResult
from .operations import ModelOnDisk, ServiceStatus
from .pull import PullEvent, PullFailed, PullProgress, PullResult, PullStarted, PullWarning
from .venvs import VenvOnDisk


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class ConsoleReporter:
    """Step lines, pull progress (bytes, rate, ETA) and health waiting, on one console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._last_progress = 0.0
        self._bar: Progress | None = None  # the pull's, on a terminal
        self._task: TaskID | None = None

    def step(self, event: str, name: str) -> None:
        if event == "start":
            self.console.print(f"[bold]→ {name}[/]")
        elif event == "done":
            self.console.print(f"  [green]✓ {name}[/]")
        elif event == "skip":
            self.console.print(f"  [dim]· {name}: nothing to change[/]")
        elif event == "undo":
            self.console.print(f"  [yellow]↩ undo {name}[/]")
        elif event == "undo-failed":
            self.console.print(f"  [red]✗ undo failed: {name}[/]")

    def info(self, message: str) -> None:
        self.console.print(f"  {message}", markup=False, highlight=False)

    def warn(self, message: str) -> None:
        # Host and S3 text (an object key like `weights/[/]x`) is never read as markup.
        self.console.print(f"  [yellow]warning:[/] {escape(message)}", highlight=False)

    def pull(self, event: PullEvent) -> None:
        """A progress bar (bytes, rate, ETA) on a terminal; a line every 2 s otherwise."""
        if self.console.is_terminal and self._pull_bar(event):
            return
        if isinstance(event, PullStarted):
            self.console.print(
                f"  {event.files} files, {_size(event.total)}; to fetch {_size(event.to_fetch)}"
                + (
                    f" (resuming: {_size(event.resumed_bytes)} already here)"
                    if event.resumed_bytes
                    else ""
                )
            )
        elif isinstance(event, PullProgress):
            now = time.monotonic()
            if now - self._last_progress < 2.0 and event.bytes < event.total:
                return
            self._last_progress = now
            eta = f", ETA {event.eta_s:.0f}s" if event.eta_s is not None else ""
            self.console.print(
                f"  {_size(event.bytes)} / {_size(event.total)} "
                f"at {_size(event.rate_bps or 0)}/s{eta}",
                highlight=False,
            )
        elif isinstance(event, PullWarning):
            self.warn(event.message)
        elif isinstance(event, PullResult):
            self.console.print(f"  {event.status}: {event.path}", markup=False, highlight=False)

    def _pull_bar(self, event: PullEvent) -> bool:
        """Draw ``event`` on the bar; False: print it as a line as well."""
        if isinstance(event, PullStarted):
            self._bar = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                escape(f"{event.name}@{event.revision}"),
                total=event.total,
                completed=event.resumed_bytes,
            )
            return False  # the files/size line is worth keeping above the bar
        if self._bar is None or self._task is None:
            return False
        if isinstance(event, PullProgress):
            self._bar.update(self._task, completed=event.bytes, total=event.total)
            return True
        if isinstance(event, PullResult | PullFailed):
            if isinstance(event, PullResult):
                self._bar.update(self._task, completed=event.total)
            self._bar.stop()
            self._bar = self._task = None
        return False

    def health(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "waiting":
            self.console.print(
                f"  waiting for health: unit {event.get('unit_state')}, "
                f"health {event.get('health')}, {event.get('elapsed_s')}s",
                markup=False,
                highlight=False,
            )
        elif kind == "ready":
            self.console.print(f"  [green]healthy[/] after {event.get('elapsed_s')}s")


def render_result(result: ApplyResult, console: Console, *, address: str | None) -> None:
    if result.outcome == "unchanged":
        console.print(f"[green]{result.model} is already deployed and healthy; nothing changed[/]")
    else:
        console.print(
            f"[green bold]deployed {result.model}[/] on port {result.port} "
            f"(release #{result.release}) in {result.duration_s:.1f}s"
        )
    base = f"http://{address or 'HOST'}:{result.port}"
    console.print(f"  status: {base}/status   health: {base}/health   API: {base}/v1")


def apply_json(result: ApplyResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome,
        "model": result.model,
        "port": result.port,
        "model_path": result.model_path,
        "release": result.release,
        "duration_s": round(result.duration_s, 2),
        "status": result.status,
        "fetched_bytes": result.pulled.fetched_bytes if result.pulled else None,
    }


_STYLED_ROWS = frozenset({"health", "lock"})


def render_status(status: ServiceStatus, console: Console) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    health_style = "green" if status.health == "ok" else "red"
    rows = [
        ("host", status.host),
        (
            "service",
            f"{status.service}: {status.state}"
            + (f" (restarted {status.restarts}x)" if status.restarts else ""),
        ),
        ("model", status.model or "-"),
        ("revision", status.revision or "-"),
        ("quantization", status.quantization or "-"),
        ("port", str(status.port) if status.port else "-"),
        ("code", f"{status.code_id or '-'} (lock {status.lock_hash or '-'})"),
        ("health", f"[{health_style}]{status.health}[/]"),
        ("flux-api", status.flux),
        (
            "RAM",
            f"{status.ram_available_gb} GB available of {status.ram_total_gb} GB"
            + (
                f"; service uses {status.service_memory_gb} GB"
                if status.service_memory_gb is not None
                else ""
            ),
        ),
    ]
    for gpu in status.gpu:
        rows.append(
            (f"GPU {gpu['index']}", f"{gpu['name']}: {gpu['used_mib']} / {gpu['total_mib']} MiB")
        )
    if not status.gpu:
        rows.append(("GPU", "none found"))
    if status.lock:
        rows.append(("lock", f"[yellow]{escape(status.lock)}[/]"))
    for key, value in rows:
        # Values come from the host: plain text, except the styles this function adds.
        table.add_row(key, value if key in _STYLED_ROWS else Text(value))
    console.print(table)


def render_models(found: list[ModelOnDisk], console: Console) -> None:
    """The host's model revisions, largest concern first: what is live, what a rollback
    needs, what ``--prune`` would delete."""
    if not found:
        console.print("no models on the host")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("model", "revision", "size", "needed by", "path"):
        table.add_column(column)
    for model in found:
        needed = "live" if model.live else "kept release" if model.kept else "nothing (prunable)"
        table.add_row(
            Text(model.name),
            Text(model.revision),
            _size(model.size_bytes),
            needed,
            Text(model.path),
        )
    console.print(table)
    prunable = sum(m.size_bytes for m in found if not (m.live or m.kept))
    if prunable:
        console.print(f"--prune would free {_size(prunable)}")


def render_venvs(found: list[VenvOnDisk], console: Console) -> None:
    """The host's service and engine venvs: which the live or a kept release needs, which
    ``--prune`` would delete."""
    if not found:
        console.print("no venvs on the host")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("kind", "venv", "size", "needed by", "path"):
        table.add_column(column)
    for venv in found:
        needed = "live" if venv.live else "kept release" if venv.kept else "nothing (prunable)"
        if not venv.complete:
            needed += ", half-built"
        table.add_row(venv.kind, Text(venv.name), _size(venv.size_bytes), needed, Text(venv.path))
    console.print(table)
    prunable = sum(v.size_bytes for v in found if v.prunable)
    if prunable:
        console.print(f"--prune would free {_size(prunable)}")
