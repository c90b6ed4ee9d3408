"""``validate-components``: pre-flight checks of the whole chain, before any deploy.

    validate-components [--only ssh,s3] [--models demo-tiny] [--strict] [--json]
                        [--min-disk-gb N] [--min-ram-gb N] [--trust-new-host-key] [--config PATH]

Checks config, ssh, sudo, resources, systemd, python, s3 and health (see ``deployer.checks``)
and prints a table, or JSON with ``--json``. Nothing on the host is changed.

Exit codes: 0 every check passed (warnings allowed), 1 a check failed, or warned with
``--strict``; 2 a bad flag. A failing check never stops the others; errors of this command
itself are one line on stderr (a traceback only with ``--debug`` or ``MODEL_DEPLOYER_DEBUG=1``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from .cli import (
    EXIT_CODES,
    _debug_wanted,
    config_option,
    debug_option,
    run_guarded,
    trust_new_host_key_option,
)
from .core import Core, core_of

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from .checks import CheckResult, Options, Report
    from .config import Settings
    from .ssh import Executor

STATUS_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}
STATUS_WORD = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}
GROUP_HELP = "config, ssh, sudo, resources, systemd, python, s3, health"


def render_report(report: Report, console: Console) -> None:
    """The report as a Rich table (a remedy under its value) and a one-line summary."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="validate-components", title_justify="left", expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("value / remedy", overflow="fold")
    table.add_column("time", justify="right", no_wrap=True)
    for result in report.results:
        table.add_row(
            result.name,
            Text(STATUS_WORD[result.status], style=STATUS_STYLE[result.status]),
            _value_cell(result),
            f"{result.duration_s * 1000:.0f} ms",
        )
    console.print(table)
    console.print(summary_line(report))


def _value_cell(result: CheckResult) -> Text:
    from rich.text import Text

    from .plan_view import redact

    cell = Text(redact(result.value))
    if result.remedy:
        cell.append("\n→ " + redact(result.remedy), style=STATUS_STYLE[result.status].split()[-1])
    return cell


def summary_line(report: Report) -> str:
    counts = report.counts()
    verdict = "OK" if report.exit_code == 0 else "NOT OK"
    strict = " (--strict: warnings fail)" if report.strict and counts["warn"] else ""
    return (
        f"{verdict}: {counts['pass']} passed, {counts['warn']} warned, {counts['fail']} failed "
        f"in {report.duration_s:.2f} s{strict}"
    )


def report_json(report: Report) -> str:
    from .plan_view import redact as redact_env
    from .redact import redact

    return redact_env(json.dumps(redact(report.to_json()), indent=2))


def _options(
    config_path: str | None,
    only: str | None,
    models: str | None,
    strict: bool,
    min_disk_gb: float | None,
    min_ram_gb: float | None,
    trust_new_host_key: bool,
    debug: bool,
) -> Options:
    from .checks import Options, parse_list, parse_only

    try:
        groups = parse_only(only)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from None
    return Options(
        only=groups,
        strict=strict,
        models=parse_list(models),
        min_disk_gb=min_disk_gb,
        min_ram_gb=min_ram_gb,
        trust_new_host_key=trust_new_host_key,
        config_path=config_path,
        debug=debug,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="model-deployer", prog_name="validate-components")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--only", default=None, help=f"Comma-separated checks to run: {GROUP_HELP}.")
@click.option(
    "--models",
    default=None,
    help="Comma-separated catalog models whose S3 prefixes to check (default: all; a missing "
    "prefix then only warns, while a named model that is missing fails).",
)
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@click.option(
    "--min-disk-gb",
    type=click.FloatRange(min=0),
    default=None,
    help="Fail when less is free under remote.models_dir (default: the selected models' "
    "sizes plus policy.disk_margin_gb; below the largest only warns).",
)
@click.option(
    "--min-ram-gb",
    type=click.FloatRange(min=0),
    default=None,
    help="Fail when less host RAM is available, warn under twice it "
    "(default: policy.ram_margin_gb).",
)
@trust_new_host_key_option
@debug_option
def main(
    config_path: str | None,
    as_json: bool,
    only: str | None,
    models: str | None,
    strict: bool,
    min_disk_gb: float | None,
    min_ram_gb: float | None,
    trust_new_host_key: bool,
    debug: bool,
) -> None:
    """Check that config, SSH, sudo, host resources, systemd, Python, S3 and the service's
    health endpoints are ready for a deploy. Read-only."""
    debug = _debug_wanted(debug)
    options = _options(
        config_path, only, models, strict, min_disk_gb, min_ram_gb, trust_new_host_key, debug
    )
    core = core_of(click.get_current_context().obj)
    run_guarded(lambda: _run(core, options, as_json), debug=debug)


def _run(core: Core, options: Options, as_json: bool) -> int:
    """Run the checks through ``core`` (the host too: ``core.open_host``) and print them."""
    from rich.console import Console

    def host_factory(settings: Settings, trust_new_host_key: bool) -> Executor:
        return core.open_host(settings, trust_new_host_key=trust_new_host_key)

    report = core.run_checks(options, host_factory=host_factory)
    if as_json:
        click.echo(report_json(report))
    else:
        render_report(report, Console(highlight=False, soft_wrap=False))
    return report.exit_code


if __name__ == "__main__":
    main()
