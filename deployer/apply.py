"""Carry out a plan on the host, exactly as ``--dry-run`` showed it, or put the host back.

Order (the plan's ``steps``): take the host lock; re-inspect and stop if the plan no longer
holds; check the S3 source from here; install the service venv and pull the weights (neither
touches what is running); then the switch: write the env file and unit and point the venv
link, run the bootstrap hook, stop Flux if the plan says so, (re)start the unit, wait until
``/health`` is ok and ``/status`` names the model; publish the discovery variables; record
the release and the audit entry; release the lock.

Everything from the switch on is a ``Step`` with an ``undo``: when a step fails, the steps
done are undone in reverse, which restores the previous unit, env file and venv (and starts
the previous service again if it was running) and starts Flux again if we stopped it. The
weights and venvs stay on disk: they are verified, unused until switched to, and make the next
attempt fast.

A deploy whose unit, env file, venv, weights and discovery files are already exactly what the
plan wants, with the service healthy, changes nothing and says so.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import audit, commands, flux_parking
from .catalog import Catalog, ModelSpec
from .config import Settings
from .errors import DeployError, HealthCheckTimeout, PlanOutdated, PlanRefused
from .facts import STATE_FILE_NAME, DeploymentState, HostFacts
from .lock import HostLock
from .planner import Plan
from .probe import inspect_host
from .pull import PullEvent, PullResult, pull_request, run_pull
from .redact import Secret
from .releases import Release, Releases
from .s3 import preflight_source
from .service_code import (
    build_wheel,
    code_id,
    current_venv,
    install_venv,
    lock_hash,
    switch_venv_argv,
)
from .ssh import Executor
from .steps import Step, StepFailure, run_steps
from .unit import (
    FileWrite,
    ServiceEnv,
    refuse_foreign_unit,
    service_env,
    unit_files,
    write_file,
)

HEALTH_SCRIPT = Path(__file__).resolve().parent / "remote" / "wait_healthy.py"


class Reporter(Protocol):
    """How apply talks to the operator (the CLI renders it; tests record it)."""

    def step(self, event: str, name: str) -> None: ...

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def pull(self, event: PullEvent) -> None: ...

    def health(self, event: dict[str, Any]) -> None: ...


class SilentReporter:
    def step(self, event: str, name: str) -> None: ...

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def pull(self, event: PullEvent) -> None: ...

    def health(self, event: dict[str, Any]) -> None: ...


@dataclass
class ApplyOptions:
    lock_wait_s: float = 0.0
    force_unlock: bool = False
    command: str = "deploy-model"
    # The service's API key (deployer.auth decides it); None: no key.
    api_key: str | None = field(default=None, repr=False)
    wheel_cache: Path = field(
        default_factory=lambda: (
            Path(os.environ.get("MODEL_DEPLOYER_CACHE", Path.home() / ".cache" / "model-deployer"))
            / "wheels"
        )
    )


@dataclass
class ApplyResult:
    outcome: str  # deployed | unchanged
    model: str
    port: int
    model_path: str
    release: int | None
    status: dict[str, Any]
    duration_s: float
    pulled: PullResult | None = None


@dataclass
class HostSnapshot:
    """What the switch replaces, captured before it, so that undo can put it back."""

    files: dict[str, str | None]  # path -> content (None: did not exist)
    venv: str | None
    service_active: bool
    flux_active: bool
    deployed: DeploymentState | None = None
    flux_enabled: bool | None = None

    def file(self, path: str) -> str | None:
        return self.files.get(path)


def read_remote(executor: Executor, path: str) -> str | None:
    result = executor.run(["cat", "--", path], sudo=True, check=False)
    return result.stdout if result.ok else None


def snapshot(
    executor: Executor, settings: Settings, paths: list[str], facts: HostFacts
) -> HostSnapshot:
    return HostSnapshot(
        files={path: read_remote(executor, path) for path in paths},
        venv=current_venv(executor, settings),
        service_active=facts.inference.active,
        flux_active=facts.flux.active,
        deployed=facts.deployed,
        flux_enabled=flux_parking.is_enabled(executor, settings.remote.flux_service),
    )


def _flux_was_enabled(before: HostSnapshot) -> bool | None:
    """Flux's enablement before any deploy of ours parked it: what an earlier replace deploy
    recorded, else what the snapshot found."""
    earlier = before.deployed
    if earlier is not None and earlier.flux_stopped:
        return earlier.flux_was_enabled
    return before.flux_enabled


def restore_file(executor: Executor, write: FileWrite, previous: str | None) -> None:
    if previous is None:
        executor.run(commands.remove(write.path), sudo=True)
    else:
        write_file(executor, FileWrite(write.path, Secret(previous), write.mode, write.owner))


def wait_healthy(
    executor: Executor,
    settings: Settings,
    *,
    port: int,
    model: str,
    timeout_s: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    max_restarts: int = 1,
) -> dict[str, Any]:
    """Poll, on the host, until the service is ready; returns its ``/status``."""
    events: list[dict[str, Any]] = []

    def feed(line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        events.append(event)
        if on_event:
            on_event(event)

    result = executor.run(
        [
            settings.remote.python,
            "-",
            str(port),
            model,
            str(timeout_s),
            settings.remote.service_name,
            str(max_restarts),
        ],
        stdin=HEALTH_SCRIPT.read_text(encoding="utf-8"),
        check=False,
        timeout=timeout_s + 60,
        on_output=feed,
        what="wait for health",
    )
    if not events:
        for line in result.stdout.splitlines():
            feed(line)
    last = events[-1] if events else {}
    if result.ok and last.get("event") == "ready":
        return dict(last.get("status") or {})
    reason = {
        "timeout": f"not healthy after {timeout_s:g}s (unit {last.get('unit_state')}, "
        f"health {last.get('health')})",
        "failed": f"the service crashed while starting (unit {last.get('unit_state')}, "
        f"restarts {last.get('restarts')})",
        "wrong-model": f"port {port} serves {last.get('serving')!r}, not {model!r}",
    }.get(str(last.get("event")), f"health wait ended with exit {result.exit_code}")
    raise HealthCheckTimeout(reason)


def journal_tail(executor: Executor, settings: Settings, lines: int = 20) -> str:
    result = executor.run(
        commands.journal(settings.remote.service_name, lines), sudo=True, check=False
    )
    return result.stdout.strip()


class Deployment:
    """One ``deploy-model NAME`` run against one host."""

    def __init__(
        self,
        *,
        plan: Plan,
        spec: ModelSpec,
        catalog: Catalog,
        settings: Settings,
        executor: Executor,
        reporter: Reporter | None = None,
        options: ApplyOptions | None = None,
    ) -> None:
        if not plan.can_apply or plan.service is None or plan.port is None:
            raise PlanRefused(f"cannot deploy {plan.model}: {plan.refusal_message()}")
        self.plan = plan
        self.spec = spec
        self.weights_spec = catalog.models[plan.weights_model]
        self.catalog = catalog
        self.settings = settings
        self.executor = executor
        self.report = reporter or SilentReporter()
        self.options = options or ApplyOptions()
        self.api_key = self.options.api_key
        self.started = time.monotonic()

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> ApplyResult:
        state_dir = self.settings.remote.state_dir
        lock = HostLock(
            self.executor, state_dir, command=self.options.command, warn=self.report.warn
        )
        # The source is checked from here before the host is touched at all.
        preflight_source(
            self.settings.s3.bucket or self.catalog.bucket,
            self.weights_spec.s3_prefix,
            region=self.settings.s3.region,
            endpoint_url=self.settings.s3.endpoint_url,
        )
        self.report.step("start", "lock")
        lock.acquire(wait_s=self.options.lock_wait_s, force=self.options.force_unlock)
        self.report.step("done", "lock")
        try:
            result = self._locked()
        except BaseException as exc:
            self._audit("failed", error=str(exc))
            raise
        finally:
            lock.release()
        self._audit(result.outcome, details={"release": result.release, "port": result.port})
        return result

    def _locked(self) -> ApplyResult:
        self.report.step("start", "re-inspect")
        facts = inspect_host(self.executor, self.settings.remote)
        moved = self.plan.still_holds(facts)
        if moved:
            raise PlanOutdated(
                "the host changed since the plan: " + "; ".join(moved),
                hint="run the deploy again to plan against the host as it is now",
            )
        self.report.step("done", "re-inspect")
        refuse_foreign_unit(self.executor, self.settings)

        bucket = self.settings.s3.bucket or self.catalog.bucket
        self._prepare_dirs()

        self.report.step("start", "install-venv")
        ident = code_id()
        wheel = build_wheel(self.options.wheel_cache, ident)
        venv = install_venv(self.executor, self.settings, wheel, ident)
        self.report.step("done", "install-venv")

        self.report.step("start", "pull-weights")
        pulled = run_pull(
            self.executor,
            pull_request(
                self.settings,
                self.weights_spec,
                bucket=bucket,
                concurrency=self.settings.s3.pull_concurrency,
                max_rate=int(self.settings.s3.pull_max_rate_mbps * 1e6 / 8) or None,
                part_size=self.settings.s3.pull_part_mb * 1024 * 1024,
            ),
            python=f"{venv}/bin/python",
            on_event=self.report.pull,
        )
        self.report.step("done", "pull-weights")
        if self.spec.bootstrap and self.spec.bootstrap.step == "after-pull":
            self._bootstrap(pulled.path, venv)

        env = self._service_env(pulled.path)
        writes = unit_files(self.settings, env)
        before = snapshot(self.executor, self.settings, [w.path for w in writes], facts)
        if self._unchanged(writes, before, venv, facts):
            status = self._health(timeout_s=15.0)
            self.report.info("already deployed exactly as planned and healthy: nothing to do")
            return ApplyResult(
                "unchanged",
                self.plan.model,
                self.plan.port or 0,
                pulled.path,
                None,
                status,
                time.monotonic() - self.started,
                pulled,
            )

        status: dict[str, Any] = {}

        def wait() -> None:
            status.update(self._health(timeout_s=self.settings.service.health_timeout_s))

        steps = self._switch_steps(writes, before, venv, pulled.path, wait)
        try:
            run_steps(steps, self.report.step)
        except StepFailure as failure:
            raise self._failed(failure) from failure.error
        release = self._record(pulled, venv, ident, writes, before)
        return ApplyResult(
            "deployed",
            self.plan.model,
            self.plan.port or 0,
            pulled.path,
            release.number,
            status,
            time.monotonic() - self.started,
            pulled,
        )

    # -- pieces -----------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        remote = self.settings.remote
        self.executor.run(commands.make_dir(remote.state_dir, owner="root"), sudo=True)
        self.executor.run(commands.make_dir(remote.service_dir, owner="root"), sudo=True)
        # The pull runs as the SSH user; the service only reads (0755).
        self.executor.run(
            commands.make_dir(remote.models_dir, owner=self.settings.host.user), sudo=True
        )

    def _service_env(self, model_path: str) -> ServiceEnv:
        service = self.plan.service
        assert service is not None
        dtype = "auto" if service.torch_dtype == "bfloat16" else service.torch_dtype
        return service_env(
            self.settings,
            model_dir=model_path,
            model_name=self.plan.model,
            port=service.port,
            quantization=service.quantization,
            dtype=dtype,
            api_key=Secret(self.api_key) if self.api_key else None,
            max_model_len=service.max_context_tokens,
        )

    def _unchanged(
        self, writes: list[FileWrite], before: HostSnapshot, venv: str, facts: HostFacts
    ) -> bool:
        deployed = facts.deployed
        return (
            before.service_active
            and before.venv == venv
            and all(before.file(w.path) == w.stdin() for w in writes)
            and deployed is not None
            and deployed.model == self.plan.model
            and deployed.port == self.plan.port
            and (self.plan.stop_flux is False or not facts.flux.active)
        )

    def _health(self, *, timeout_s: float) -> dict[str, Any]:
        assert self.plan.port is not None
        return wait_healthy(
            self.executor,
            self.settings,
            port=self.plan.port,
            model=self.plan.model,
            timeout_s=timeout_s,
            on_event=self.report.health,
        )

    def _bootstrap(self, model_path: str, venv: str) -> None:
        assert self.spec.bootstrap is not None
        script = Path(self.catalog_root(), self.spec.bootstrap.script)
        self.report.info(f"bootstrap: {self.spec.bootstrap.script}")
        self.executor.run(
            ["sh", "-s"],
            sudo=True,
            stdin=script.read_text(encoding="utf-8"),
            env={
                "MODEL_NAME": self.plan.model,
                "MODEL_DIR": model_path,
                "SERVICE_DIR": self.settings.remote.service_dir,
                "VENV": venv,
            },
            on_output=lambda line: self.report.info(f"  bootstrap| {line}"),
            what=f"bootstrap {self.spec.bootstrap.script}",
        )

    def catalog_root(self) -> Path:
        path = self.settings.catalog
        return path.resolve().parent if path else Path(__file__).resolve().parent.parent

    def _switch_steps(
        self,
        writes: list[FileWrite],
        before: HostSnapshot,
        venv: str,
        model_path: str,
        wait: Callable[[], None],
    ) -> list[Step]:
        ex = self.executor
        remote = self.settings.remote
        unit = remote.service_name
        service_writes = [
            w
            for w in writes
            if w.path.startswith(remote.service_dir) or w.path.endswith(".service")
        ]
        discovery_writes = [w for w in writes if w not in service_writes]

        def install() -> None:
            for write in service_writes:
                write_file(ex, write)
            for argv in switch_venv_argv(self.settings, venv):
                ex.run(argv, sudo=True)
            ex.run(commands.daemon_reload(), sudo=True)

        def uninstall() -> None:
            for write in service_writes:
                restore_file(ex, write, before.file(write.path))
            if before.venv:
                for argv in switch_venv_argv(self.settings, before.venv):
                    ex.run(argv, sudo=True)
            ex.run(commands.daemon_reload(), sudo=True)
            # The previous service kept running until ``start``; only then must it come back.
            if before.service_active and started:
                ex.run(commands.reset_failed(unit), sudo=True, check=False)
                ex.run(commands.restart(unit), sudo=True)
                self.report.info(f"previous {unit} restarted")
                if before.deployed is not None:
                    wait_healthy(
                        ex,
                        self.settings,
                        port=before.deployed.port,
                        model=before.deployed.model,
                        timeout_s=self.settings.service.health_timeout_s,
                        on_event=self.report.health,
                    )

        started: list[bool] = []

        def start() -> None:
            started.append(True)
            ex.run(commands.reset_failed(unit), sudo=True, check=False)
            ex.run(commands.enable(unit), sudo=True)
            ex.run(commands.restart(unit), sudo=True)

        def stop_new() -> None:
            ex.run(commands.stop(unit), sudo=True, check=False)
            if not before.service_active:
                ex.run(commands.disable(unit), sudo=True, check=False)

        def stop_flux() -> None:
            # Stopped and disabled: a reboot of the host does not start it again.
            flux_parking.park(ex, remote.flux_service)

        def start_flux() -> None:
            flux_parking.unpark(ex, remote.flux_service, was_enabled=before.flux_enabled)
            self.report.info(f"{remote.flux_service} started again")

        def publish() -> None:
            for write in discovery_writes:
                write_file(ex, write)

        def unpublish() -> None:
            for write in discovery_writes:
                restore_file(ex, write, before.file(write.path))

        steps = [Step("render-unit", "write env file and unit, switch venv", install, uninstall)]
        bootstrap = self.spec.bootstrap
        if bootstrap and bootstrap.step == "before-start":
            steps.append(
                Step("bootstrap", bootstrap.script, lambda: self._bootstrap(model_path, venv))
            )
        if self.plan.stop_flux and (before.flux_active or before.flux_enabled):
            steps.append(Step("stop-flux", f"stop {remote.flux_service}", stop_flux, start_flux))
        steps.append(Step("start", f"start {unit}", start, stop_new))
        steps.append(Step("wait-healthy", "wait for /health and /status", wait))
        if bootstrap and bootstrap.step == "after-start":
            steps.append(
                Step("bootstrap", bootstrap.script, lambda: self._bootstrap(model_path, venv))
            )
        steps.append(Step("write-discovery-env", "publish the endpoint", publish, unpublish))
        return steps

    def _failed(self, failure: StepFailure) -> DeployError:
        journal = journal_tail(self.executor, self.settings)
        undone = ", ".join(failure.undone) or "nothing"
        message = f"deploy of {self.plan.model} failed at {failure.step}: {failure.error}"
        message += f"; rolled back ({undone})"
        if failure.undo_errors:
            message += "; ROLLBACK INCOMPLETE: " + "; ".join(
                f"{s}: {e}" for s, e in failure.undo_errors
            )
        error = DeployError(message, hint="the service's last log lines are shown above")
        error.journal = journal  # type: ignore[attr-defined]
        return error

    def _record(
        self,
        pulled: PullResult,
        venv: str,
        ident: str,
        writes: list[FileWrite],
        before: HostSnapshot,
    ) -> Release:
        remote = self.settings.remote
        unit_text = next(w.stdin() for w in writes if w.path.endswith(remote.service_name))
        state = DeploymentState(
            model=self.plan.model,
            weights_model=self.plan.weights_model,
            revision=pulled.revision,
            port=self.plan.port or 0,
            quantization=self.plan.quantization,
            service=remote.service_name,
            flux_stopped=self.plan.stop_flux,
            flux_was_enabled=_flux_was_enabled(before) if self.plan.stop_flux else None,
            deployed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            plan_id=self.plan.plan_id,
            code_id=ident,
            lock_hash=lock_hash(),
        )
        release = Release(
            model=self.plan.model,
            revision=pulled.revision,
            model_path=pulled.path,
            port=self.plan.port or 0,
            quantization=self.plan.quantization,
            service_name=remote.service_name,
            unit_text=unit_text,
            extra={**state.to_file(), "venv": venv},
        )
        releases = Releases(self.executor, remote.state_dir)
        saved = releases.record(
            release,
            env_source=f"{remote.service_dir}/service.env",
            keep=self.settings.service.keep_releases,
            operator=audit.operator_id(),
        )
        write_file(
            self.executor,
            FileWrite(
                f"{remote.state_dir}/{STATE_FILE_NAME}",
                json.dumps({**json.loads(saved.to_json()), **state.to_file()}, indent=1) + "\n",
                mode="0644",
            ),
        )
        return saved

    def _audit(
        self, outcome: str, *, error: str | None = None, details: dict | None = None
    ) -> None:
        entry = audit.AuditEntry(
            command=self.options.command,
            outcome=outcome,
            model=self.plan.model,
            plan={
                k: self.plan.to_json()[k]
                for k in ("action", "port", "quantization", "stop_flux", "need_gb", "plan_id")
            },
            duration_s=time.monotonic() - self.started,
            error=error,
            details=details or {},
        )
        try:
            audit.append(
                self.executor,
                self.settings.remote.state_dir,
                entry,
                secrets=[self.api_key] if self.api_key else [],
                python=self.settings.remote.python,
            )
        except DeployError as exc:
            self.report.warn(f"could not append to the audit log: {exc}")
