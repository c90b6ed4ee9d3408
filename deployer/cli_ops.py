"""``model-deployer``: the operations around a deployment.

    model-deployer status [--json]            what runs, port, health, model, GPU/RAM, Flux
    model-deployer logs [-n 50] [-f]          the service's journal
    model-deployer undeploy [--purge-models]  stop and remove the service, start Flux again
    model-deployer rollback                   put the previous release back
    model-deployer flux start|stop|status     the resident Flux service
    model-deployer audit [-n 20]              the host's audit log
    model-deployer models [--prune]           model revisions on the host's disk
    model-deployer venvs [--prune]            service and engine venvs on the host's disk
    model-deployer unlock                     break a deploy lock whose holder is gone

Same config, exit codes and error rules as ``deploy-model``. Every command takes ``--json``,
and the group's options (``--config``, ``--trust-new-host-key``, ``--debug``) before or after
the subcommand.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .cli import (
    EXIT_CODES,
    _debug_wanted,
    config_option,
    debug_option,
    run_guarded,
    trust_new_host_key_option,
    yes_option,
)
from .core import Core, core_of

if TYPE_CHECKING:
    from .config import Settings
    from .ssh import Executor


class _Ctx:
    def __init__(self, config_path: str | None, trust: bool, debug: bool, core: Core) -> None:
        self.config_path = config_path
        self.trust = trust
        self.debug = debug
        self.core = core

    def settings(self) -> Settings:
        from .config import load_settings

        return load_settings(self.config_path)

    def host(self, settings: Settings) -> Executor:
        return self.core.open_host(settings, trust_new_host_key=self.trust)


def _set_on_ctx(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value and isinstance(ctx.obj, _Ctx):
            setattr(ctx.obj, attr, _debug_wanted(value) if attr == "debug" else value)

    return store


def shared_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The group's options, accepted after the subcommand as well
    (``model-deployer status --config X``); there they win over the group's."""
    for option in (
        click.option(
            "--config",
            type=click.Path(dir_okay=False),
            expose_value=False,
            callback=_set_on_ctx("config_path"),
            help="Config file (as before the subcommand).",
        ),
        click.option(
            "--trust-new-host-key",
            is_flag=True,
            expose_value=False,
            callback=_set_on_ctx("trust"),
            help="As before the subcommand.",
        ),
        click.option(
            "--debug",
            is_flag=True,
            expose_value=False,
            callback=_set_on_ctx("debug"),
            help="Tracebacks on errors.",
        ),
    ):
        command = option(command)
    return command


def _json_out(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _with_host(ctx: _Ctx, action: Callable[[Settings, Executor], int | None]) -> None:
    def work() -> int | None:
        settings = ctx.settings()
        host = ctx.host(settings)
        try:
            return action(settings, host)
        finally:
            host.close()

    run_guarded(work, debug=ctx.debug)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nExamples:\n"
    "  model-deployer status\n"
    "  model-deployer logs -f\n"
    "  model-deployer undeploy --purge-models --yes\n"
    "  model-deployer audit --verify\n\n" + EXIT_CODES,
)
@click.version_option(package_name="model-deployer", prog_name="model-deployer")
@config_option
@trust_new_host_key_option
@debug_option
@click.pass_context
def main(
    ctx: click.Context, config_path: str | None, trust_new_host_key: bool, debug: bool
) -> None:
    """Operate the model deployment on the GPU host."""
    ctx.obj = _Ctx(config_path, trust_new_host_key, _debug_wanted(debug), core_of(ctx.obj))


@main.command()
@shared_options
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@click.pass_obj
def status(ctx: _Ctx, as_json: bool) -> None:
    """What runs on the host, and whether it is healthy (exit 1 when deployed but unhealthy)."""

    def action(settings: Settings, host: Executor) -> int:
        from .apply_view import render_status
        from .operations import service_status

        result = service_status(host, settings)
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2, default=str))
        else:
            render_status(result, _console())
        return 1 if result.model and result.health != "ok" else 0

    _with_host(ctx, action)


@main.command()
@shared_options
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.pass_obj
def logs(ctx: _Ctx, lines: int, follow: bool) -> None:
    """The service's journal."""

    def action(settings: Settings, host: Executor) -> None:
        from .operations import stream_logs

        stream_logs(host, settings, lines=lines, follow=follow, on_line=click.echo)

    _with_host(ctx, action)


@main.command()
@shared_options
@click.option(
    "--purge-models",
    is_flag=True,
    help="Also delete the model directories this tool's releases downloaded (nothing else).",
)
@click.option("--keep-flux-stopped", is_flag=True, help="Do not start Flux again.")
@click.option("--lock-wait", default=0.0, type=click.FloatRange(0), help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@yes_option
@click.pass_obj
def undeploy(
    ctx: _Ctx,
    purge_models: bool,
    keep_flux_stopped: bool,
    lock_wait: float,
    as_json: bool,
    yes: bool,
) -> None:
    """Stop and remove the inference service (unit, venv, env files); start Flux again."""

    def action(settings: Settings, host: Executor) -> None:
        from .consent import require
        from .operations import undeploy as run

        result = run(
            host,
            settings,
            purge_models=purge_models,
            start_flux=not keep_flux_stopped,
            lock_wait_s=lock_wait,
            confirm=lambda changes: require("undeploy", changes, yes=yes),
        )
        if as_json:
            _json_out({"removed": result.removed, "flux": result.flux})
            return
        for path in result.removed:
            click.echo(f"removed {path}")
        click.echo(f"{settings.remote.flux_service}: {result.flux}")

    _with_host(ctx, action)


@main.command()
@shared_options
@click.option("--lock-wait", default=0.0, type=click.FloatRange(0), help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@yes_option
@click.pass_obj
def rollback(ctx: _Ctx, lock_wait: float, as_json: bool, yes: bool) -> None:
    """Put the previous release (unit, env file, venv, weights) back and wait for health."""

    def action(settings: Settings, host: Executor) -> None:
        from .apply_view import ConsoleReporter
        from .consent import require
        from .operations import rollback as run

        reporter = ConsoleReporter(_console(stderr=as_json))
        release = run(
            host,
            settings,
            lock_wait_s=lock_wait,
            on_health=reporter.health,
            confirm=lambda changes: require("rollback", changes, yes=yes),
        )
        if as_json:
            _json_out(
                {
                    "release": release.number,
                    "model": release.model,
                    "revision": release.revision,
                    "port": release.port,
                    "quantization": release.quantization,
                }
            )
        else:
            click.echo(f"rolled back to {release.summary()}")

    _with_host(ctx, action)


@main.command()
@shared_options
@click.argument("action", type=click.Choice(["start", "stop", "restart", "status"]))
@click.option("--lock-wait", default=0.0, type=click.FloatRange(0), help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@click.pass_obj
def flux(ctx: _Ctx, action: str, lock_wait: float, as_json: bool) -> None:
    """Start, stop or show the resident Flux service (changes take the host lock)."""

    def run(settings: Settings, host: Executor) -> None:
        from .operations import flux as do

        state = do(host, settings, action, lock_wait_s=lock_wait)
        if as_json:
            _json_out({"unit": settings.remote.flux_service, "action": action, "state": state})
        else:
            click.echo(f"{settings.remote.flux_service}: {state}")

    _with_host(ctx, run)


@main.command()
@shared_options
@click.option("-n", "--lines", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout.")
@click.option(
    "--verify", is_flag=True, help="Check the log's hash chain (exit 1 when it is broken)."
)
@click.pass_obj
def audit(ctx: _Ctx, lines: int, as_json: bool, verify: bool) -> None:
    """The last entries of the host's audit log, or whether its chain holds."""

    def action(settings: Settings, host: Executor) -> int | None:
        from .operations import audit_tail

        if verify:
            from .audit import verify as check

            report = check(host, settings.remote.state_dir)
            if as_json:
                click.echo(json.dumps({"holds": report.holds, **report.__dict__}))
            else:
                click.echo(report.describe())
            return 0 if report.holds else 1

        for entry in audit_tail(host, settings, lines):
            if as_json:
                click.echo(json.dumps(entry, sort_keys=True))
            else:
                click.echo(
                    f"{entry.get('time', '?')}  {entry.get('operator', '?')}  "
                    f"{entry.get('command', '?')} {entry.get('model') or ''}  "
                    f"{entry.get('outcome', '?')}"
                    + (f"  ({entry['error']})" if entry.get("error") else "")
                )
        return None

    _with_host(ctx, action)


@main.command()
@shared_options
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@click.pass_obj
def unlock(ctx: _Ctx, as_json: bool) -> None:
    """Break the host's deploy lock (only when its holder is surely gone)."""

    def action(settings: Settings, host: Executor) -> None:
        from .operations import unlock as run

        info = run(host, settings)
        if as_json:
            _json_out({"broken": info.__dict__ if info else None})
        else:
            click.echo(f"broke the lock held by {info.describe()}" if info else "no lock was held")

    _with_host(ctx, action)


def _list_or_prune(
    ctx: _Ctx,
    command: str,
    noun: str,
    listing: Callable[[Executor, Settings], list[Any]],
    pruning: Callable[..., list[Any]],
    render: Callable[[list[Any], Any], None],
    *,
    prune: bool,
    lock_wait: float,
    as_json: bool,
    yes: bool,
) -> None:
    """``models`` and ``venvs``: list what is on the host's disk, or (``--prune``) delete what
    no live or kept release needs, after consent."""

    def action(settings: Settings, host: Executor) -> None:
        from .consent import require

        if prune:
            gone = pruning(
                host,
                settings,
                lock_wait_s=lock_wait,
                confirm=lambda changes: require(f"{command} --prune", changes, yes=yes),
            )
            if as_json:
                _json_out({"removed": [item.to_json() for item in gone]})
            else:
                for item in gone:
                    click.echo(f"removed {item.path}")
                click.echo(f"{len(gone)} {noun} removed")
            return
        found = listing(host, settings)
        if as_json:
            _json_out([item.to_json() for item in found])
        else:
            render(found, _console())

    _with_host(ctx, action)


@main.command()
@shared_options
@click.option("--prune", is_flag=True, help="Delete the revisions no kept release needs.")
@click.option("--lock-wait", default=0.0, type=click.FloatRange(0), help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@yes_option
@click.pass_obj
def models(ctx: _Ctx, prune: bool, lock_wait: float, as_json: bool, yes: bool) -> None:
    """The model revisions on the host's disk: size, and which the live or a kept release
    needs; --prune deletes the others (asks first)."""
    from .apply_view import render_models
    from .operations import models_on_disk, prune_models

    _list_or_prune(
        ctx, "models", "revision(s)", models_on_disk, prune_models, render_models,
        prune=prune, lock_wait=lock_wait, as_json=as_json, yes=yes,
    )  # fmt: skip


@main.command()
@shared_options
@click.option("--prune", is_flag=True, help="Delete the venvs no live or kept release needs.")
@click.option("--lock-wait", default=0.0, type=click.FloatRange(0), help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@yes_option
@click.pass_obj
def venvs(ctx: _Ctx, prune: bool, lock_wait: float, as_json: bool, yes: bool) -> None:
    """The service and engine venvs on the host's disk: size, and which the live or a kept
    release needs; --prune deletes the others (asks first)."""
    from .apply_view import render_venvs
    from .venvs import prune_venvs, venvs_on_disk

    _list_or_prune(
        ctx, "venvs", "venv(s)", venvs_on_disk, prune_venvs, render_venvs,
        prune=prune, lock_wait=lock_wait, as_json=as_json, yes=yes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
