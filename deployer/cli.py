"""``deploy-model``: the operator's command. Thin: parse, call the core, show, map errors.

    deploy-model NAME [--dry-run] [--json] [--force-quantize [4bit|8bit]]
                 [--engine auto|vllm|transformers] [--config PATH]
    deploy-model --list

Exit codes (``EXIT_CODES``): 0 a plan that can apply (or applied); 2 bad config, catalog or
unknown model; 3 host unreachable or authentication refused; 4 nothing fits (the plan is
still printed); 5 another deploy holds the host lock; 1 anything else. Errors are one line
on stderr; a traceback only with ``--debug`` or ``MODEL_DEPLOYER_DEBUG=1``.

Only click and the error classes are imported at start-up, so ``--help`` is instant; the core
(Fabric, pydantic models, Rich, and boto3 only once S3 is read) loads when a command runs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import click

from .core import Core, core_of
from .errors import DeployError, DeployFailed, PlanRefused

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem
    from rich.console import Console

    from .auth import Auth
    from .catalog import Catalog
    from .config import Settings
    from .planner import Plan
    from .ssh import Executor

DEBUG_ENV = "MODEL_DEPLOYER_DEBUG"


# The options every command line of the tool shares.
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $MODEL_DEPLOYER_CONFIG, else ./model-deployer.toml).",
)
trust_new_host_key_option = click.option(
    "--trust-new-host-key",
    is_flag=True,
    help="Record the host's SSH key when it is not known yet (never when it changed).",
)
yes_option = click.option(
    "-y",
    "--yes",
    is_flag=True,
    envvar="MODEL_DEPLOYER_YES",
    help="Go ahead without asking for changes that need consent (also MODEL_DEPLOYER_YES=1).",
)
debug_option = click.option(
    "--debug", is_flag=True, help=f"Tracebacks on errors (also {DEBUG_ENV}=1)."
)


def complete_model_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of NAME from the catalog (the one the config names, else the
    project's); nothing when it cannot be read."""
    from click.shell_completion import CompletionItem

    try:
        from .catalog import load_catalog
        from .config import load_settings

        path = ctx.params.get("config_path")
        catalog = load_catalog(load_settings(path).catalog)
    except DeployError:
        return []
    return [
        CompletionItem(name, help=str(spec.tier.value))
        for name, spec in sorted(catalog.models.items())
        if name.startswith(incomplete)
    ]


def _debug_wanted(flag: bool) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def _fail(message: str, code: int) -> NoReturn:
    from .plan_view import redact

    click.echo(_error_label() + redact(message), err=True)
    sys.exit(code)


def _error_label() -> str:
    """``error: `` in red, unless ``NO_COLOR`` is set (https://no-color.org; Rich, which
    renders everything else, honours it by itself)."""
    if os.environ.get("NO_COLOR"):
        return "error: "
    return click.style("error: ", fg="red", bold=True)


EXIT_CODES = (
    "Exit codes: 0 done (or nothing to do); 1 failed (a deploy rolled back) or unhealthy; "
    "2 bad input, config or catalog, or a change not confirmed; 3 the host cannot be "
    "reached or refused the login; 4 nothing fits, or the plan no longer holds; 5 another "
    "deploy holds the host lock; 130 interrupted."
)


def run_guarded(work: Callable[[], int | None], *, debug: bool) -> NoReturn:
    """The one error boundary of every command: run ``work``, exit with its code; a
    ``DeployError`` is one red line and its exit code, anything else one line and exit 1;
    tracebacks only with ``debug`` (the exit code stays the same)."""
    try:
        code = work() or 0
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except DeployError as exc:
        if debug:
            traceback.print_exc()
        _fail(_one_line(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
            _fail(f"unexpected {type(exc).__name__}: {exc}", 1)
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", 1)
    sys.exit(code)


def _one_line(exc: DeployError) -> str:
    text = " ".join(str(exc).split())
    if exc.hint:
        text += f" ({' '.join(exc.hint.split())})"
    return text


def apply_plan(
    plan: Plan,
    *,
    settings: Settings,
    catalog: Catalog,
    executor: Executor,
    console: Console,
    lock_wait: float,
    force_unlock: bool,
    as_json: bool,
    auth: Auth,
    core: Core,
) -> None:
    """Put ``plan`` on the host (``deployer.apply``): lock, re-check, pull, switch, verify."""
    from .apply import ApplyOptions
    from .apply_view import ConsoleReporter, apply_json, render_result
    from .plan_view import plan_json

    deployment = core.deployment(
        plan=plan,
        spec=catalog.get(plan.model),
        catalog=catalog,
        settings=settings,
        executor=executor,
        check_source=core.check_source(settings),
        build_code=core.build_code,
        code_id=core.code_id,
        reporter=ConsoleReporter(console),
        options=ApplyOptions(
            lock_wait_s=lock_wait,
            force_unlock=force_unlock,
            command=" ".join(["deploy-model", *sys.argv[1:]]),
            api_key=auth.key,
        ),
    )
    try:
        result = deployment.run()
    except DeployFailed as exc:
        if exc.journal:
            console.print("[bold]last lines of the service's journal:[/]")
            console.print(exc.journal, markup=False, highlight=False)
        raise
    if as_json:
        out = {**plan_json(plan), "apply": apply_json(result)}
        click.echo(json.dumps(out, indent=2))
    else:
        render_result(result, console, address=settings.host.address)


# -----------------------------------------------------------------------------


def _console(as_json: bool) -> Console:
    from rich.console import Console

    # JSON goes to stdout untouched; the human rendering never mixes into it.
    return Console(stderr=as_json, highlight=False, soft_wrap=False)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nExamples:\n"
    "  deploy-model --list\n"
    "  deploy-model qwen3-14b --dry-run\n"
    "  deploy-model qwen3-14b --dry-run --json > plan.json\n"
    "  deploy-model --plan plan.json --yes\n"
    "  deploy-model qwen3-coder-30b --force-quantize 8bit\n"
    "  deploy-model demo-tiny --engine vllm --dry-run\n\n" + EXIT_CODES,
)
@click.version_option(package_name="model-deployer", prog_name="deploy-model")
@click.argument("name", required=False, shell_complete=complete_model_names)
@click.option("--dry-run", is_flag=True, help="Show the plan; change nothing on the host.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option(
    "--force-quantize",
    type=click.Choice(["4bit", "8bit"]),
    is_flag=False,
    flag_value="4bit",
    default=None,
    help="Quantize even when the model fits (default 4bit). Put it after NAME.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "vllm", "transformers"]),
    default=None,
    help="Serving engine. auto: vLLM for 16-bit and AWQ checkpoints, transformers for "
    "bitsandbytes (vLLM is never used with it). Default: the catalog entry's engine, else "
    "[policy] engine, else auto.",
)
@config_option
@click.option("--list", "list_models", is_flag=True, help="List the catalog and exit.")
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Apply exactly this saved plan (from --dry-run --json); refused when it was edited, "
    "the code or lock differ, or the host's facts would now decide otherwise.",
)
@trust_new_host_key_option
@click.option(
    "--lock-wait",
    default=0.0,
    type=click.FloatRange(0),
    help="Seconds to wait for another deploy's host lock (default: fail at once).",
)
@click.option(
    "--force-unlock",
    is_flag=True,
    help="Break a host lock whose holder is gone (check `model-deployer status` first).",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve without an API key. Removes the host's key, so it needs --yes as well.",
)
@yes_option
@debug_option
def main(
    name: str | None,
    dry_run: bool,
    as_json: bool,
    force_quantize: str | None,
    engine: str | None,
    config_path: str | None,
    list_models: bool,
    plan_file: str | None,
    trust_new_host_key: bool,
    lock_wait: float,
    force_unlock: bool,
    no_auth: bool,
    yes: bool,
    debug: bool,
) -> None:
    """Plan (and, without --dry-run, apply) putting model NAME on the GPU host."""
    debug = _debug_wanted(debug)
    run_guarded(
        lambda: _run(
            name,
            dry_run,
            as_json,
            force_quantize,
            config_path,
            list_models,
            trust_new_host_key,
            lock_wait=lock_wait,
            force_unlock=force_unlock,
            no_auth=no_auth,
            yes=yes,
            plan_file=plan_file,
            engine=engine,
        ),
        debug=debug,
    )


def _run(
    name: str | None,
    dry_run: bool,
    as_json: bool,
    force_quantize: str | None,
    config_path: str | None,
    list_models: bool,
    trust_new_host_key: bool,
    *,
    lock_wait: float = 0.0,
    force_unlock: bool = False,
    no_auth: bool = False,
    yes: bool = False,
    plan_file: str | None = None,
    engine: str | None = None,
) -> int:
    from .catalog import load_catalog
    from .config import load_settings

    settings = load_settings(config_path)
    catalog = load_catalog(settings.catalog)
    if list_models:
        from .plan_view import render_catalog

        render_catalog(catalog, _console(False))
        return 0
    saved = None
    if plan_file is not None:
        from .saved_plan import load_saved_plan

        saved = load_saved_plan(plan_file)
        if name and name != saved.model:
            raise click.UsageError(f"{plan_file} is a plan for {saved.model}, not {name}")
        if dry_run:
            raise click.UsageError("--plan applies a saved plan; --dry-run makes one")
        name, force_quantize = saved.model, saved.flags.force_quantize
        engine = saved.flags.engine
    if not name:
        raise click.UsageError("give a model NAME (or --list)")
    catalog.get(name)  # unknown names fail here, before any connection

    from .auth import decide as decide_auth
    from .make_plan import make_plan
    from .plan_view import plan_to_json_text, render_plan
    from .planner import PlanFlags, with_auth

    core = core_of(click.get_current_context().obj)
    flags = PlanFlags(force_quantize=force_quantize, engine=engine)  # type: ignore[arg-type]
    console = _console(as_json)
    executor = core.open_host(settings, trust_new_host_key=trust_new_host_key)
    try:
        result = make_plan(
            name,
            settings=settings,
            catalog=catalog,
            executor=executor,
            metadata=core.open_metadata(settings, catalog),
            flags=flags,
        )
        auth = decide_auth(executor, settings, no_auth=no_auth, yes=yes)
        plan = with_auth(result.plan, "on" if auth.on else "off", auth.source)
        if saved is not None:
            from .saved_plan import check_saved_plan

            check_saved_plan(saved, plan, result.facts, settings)
            plan = saved  # exactly the reviewed plan (it decides what the fresh one does)
        if as_json and (dry_run or not plan.can_apply):
            click.echo(plan_to_json_text(plan))
        elif not as_json:
            render_plan(plan, console, dry_run=dry_run)
            console.print(f"auth: {auth.describe()}", markup=False)
        if not plan.can_apply:
            raise PlanRefused(f"{plan.model}: nothing fits: {plan.refusal_message()}")
        if dry_run:
            return 0
        from .consent import deploy_changes, require

        require(
            f"deploying {plan.model}",
            deploy_changes(plan, settings.remote.flux_service),
            yes=yes,
        )
        apply_plan(
            plan,
            settings=settings,
            catalog=catalog,
            executor=executor,
            console=console,
            lock_wait=lock_wait,
            force_unlock=force_unlock,
            as_json=as_json,
            auth=auth,
            core=core,
        )
        return 0
    finally:
        executor.close()


if __name__ == "__main__":
    main()
