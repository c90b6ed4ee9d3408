"""Text from the host or S3 is printed as text: Rich markup in it cannot crash the CLI."""

from __future__ import annotations

import io

from rich.console import Console

from deployer.apply_view import ConsoleReporter, render_status
from deployer.operations import ServiceStatus
from deployer.pull import PullWarning

HOSTILE = "weights/[/]x.safetensors [bold]not bold[/bold] [link=file:///etc]"


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, color_system=None), out


def test_pull_warning_with_markup_is_printed_verbatim() -> None:
    c, out = console()
    ConsoleReporter(c).pull(PullWarning(HOSTILE))
    assert HOSTILE in out.getvalue()


def test_health_event_with_markup_is_printed_verbatim() -> None:
    c, out = console()
    ConsoleReporter(c).health({"event": "waiting", "unit_state": "[/]", "health": "[red]"})
    assert "unit [/], health [red]" in out.getvalue()


def test_status_with_markup_from_the_host() -> None:
    c, out = console()
    status = ServiceStatus(
        host="h",
        service="asoba-inference.service",
        state="active/[/]running",
        port=8000,
        model="demo-tiny",
        quantization="none",
        revision="[/]",
        health="ok",
        restarts=0,
        flux="inactive/dead",
        gpu=[{"index": 0, "name": "GPU [/]x", "used_mib": 1, "total_mib": 2}],
        lock="held by [/] since now",
    )
    render_status(status, c)
    text = out.getvalue()
    assert "active/[/]running" in text and "GPU [/]x" in text and "held by [/]" in text
