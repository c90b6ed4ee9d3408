"""``deploy-model``: the operator's command. Thin: parse, call the core, show, map errors.

    deploy-model NAME --dry-run [--json] [--force-quantize [4bit|8bit]] [--config PATH]
    deploy-model --list

Exit codes: 0 a plan that can apply (or applied); 2 bad config, catalog or unknown model;
3 host unreachable or authentication refused; 4 nothing fits (the plan is still printed);
1 anything else. Errors are one line on stderr; a traceback only with ``--debug`` or
``MODEL_DEPLOYER_DEBUG=1``.

Only click and the error classes are imported at start-up, so ``--help`` is instant; the core
(Fabric, pydantic models, Rich, and boto3 only once S3 is read) loads when a command runs.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from .errors import DeployError, PlanRefused

if TYPE_CHECKING:
    from rich.console import Console

    from .config import Settings
    from .planner import Plan
    from .ssh import Executor

DEBUG_ENV = "MODEL_DEPLOYER_DEBUG"


def _debug_wanted(flag: bool) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def _fail(message: str, code: int) -> NoReturn:
    from .plan_view import redact

    click.echo(click.style("error: ", fg="red", bold=True) + redact(message), err=True)
    sys.exit(code)


def _one_line(exc: DeployError) -> str:
    text = " ".join(str(exc).split())
    if exc.hint:
        text += f" ({' '.join(exc.hint.split())})"
    return text


# ----------------------------------------------------------------------------- APPLY
def apply_plan(plan: Plan, *, settings: Settings, executor: Executor, console: Console) -> None:
    """APPLY PLUG-IN POINT: put ``plan`` on the host through ``executor``.

    Called only for a plan that can apply, on the same open connection the plan was made on.
    The apply stage takes the host lock, re-probes and checks ``plan.still_holds(facts)``
    (raising ``PlanOutdated`` when it returns anything), then runs ``plan.steps``.
    """
    raise DeployError(
        "apply is not available yet",
        hint=f"run `deploy-model {plan.model} --dry-run` to see the plan",
    )


# -----------------------------------------------------------------------------


def _console(as_json: bool) -> Console:
    from rich.console import Console

    # JSON goes to stdout untouched; the human rendering never mixes into it.
    return Console(stderr=as_json, highlight=False, soft_wrap=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", required=False)
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
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $MODEL_DEPLOYER_CONFIG, else ./model-deployer.toml).",
)
@click.option("--list", "list_models", is_flag=True, help="List the catalog and exit.")
@click.option(
    "--trust-new-host-key",
    is_flag=True,
    help="Record the host's SSH key when it is not known yet (never when it changed).",
)
@click.option("--debug", is_flag=True, help=f"Tracebacks on errors (also {DEBUG_ENV}=1).")
def main(
    name: str | None,
    dry_run: bool,
    as_json: bool,
    force_quantize: str | None,
    config_path: str | None,
    list_models: bool,
    trust_new_host_key: bool,
    debug: bool,
) -> None:
    """Plan (and, without --dry-run, apply) putting model NAME on the GPU host."""
    debug = _debug_wanted(debug)
    try:
        code = _run(
            name, dry_run, as_json, force_quantize, config_path, list_models, trust_new_host_key
        )
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except DeployError as exc:
        if debug:
            raise
        _fail(_one_line(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        if debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", 1)
    sys.exit(code)


def _run(
    name: str | None,
    dry_run: bool,
    as_json: bool,
    force_quantize: str | None,
    config_path: str | None,
    list_models: bool,
    trust_new_host_key: bool,
) -> int:
    from .catalog import load_catalog
    from .config import load_settings

    settings = load_settings(config_path)
    catalog = load_catalog(settings.catalog)
    if list_models:
        from .plan_view import render_catalog

        render_catalog(catalog, _console(False))
        return 0
    if not name:
        raise click.UsageError("give a model NAME (or --list)")
    catalog.get(name)  # unknown names fail here, before any connection

    from .plan_view import plan_to_json_text, render_plan
    from .planner import PlanFlags
    from .planning import make_plan, open_host, s3_metadata

    flags = PlanFlags(force_quantize=force_quantize)  # type: ignore[arg-type]
    console = _console(as_json)
    executor = open_host(settings, trust_new_host_key=trust_new_host_key)
    try:
        result = make_plan(
            name,
            settings=settings,
            catalog=catalog,
            executor=executor,
            metadata=s3_metadata(settings, catalog),
            flags=flags,
        )
        plan = result.plan
        if as_json:
            click.echo(plan_to_json_text(plan))
        else:
            render_plan(plan, console, dry_run=dry_run)
        if not plan.can_apply:
            raise PlanRefused(f"{plan.model}: nothing fits: {plan.refusal_message()}")
        if dry_run:
            return 0
        apply_plan(plan, settings=settings, executor=executor, console=console)
        return 0
    finally:
        executor.close()


if __name__ == "__main__":
    main()
