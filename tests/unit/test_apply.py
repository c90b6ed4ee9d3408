"""Apply, on a host in a directory (``tests.fake_host``): the plan's steps run in the plan's
order, a re-run changes nothing, a failure at each switch step is undone exactly, the lock
is held and released, and the bootstrap hook runs where the plan put it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployer.apply import Deployment, SilentReporter
from deployer.catalog import Bootstrap, Catalog, load_catalog
from deployer.config import Settings
from deployer.errors import (
    DeployFailed,
    LockHeld,
    ModelSourceError,
    PlanOutdated,
    RemoteCommandFailed,
)
from deployer.lock import HostLock, LockInfo
from deployer.make_plan import make_plan
from deployer.planner import Plan, PlanFlags
from deployer.service_code import engine_venv_dir
from tests.fake_host import FLUX_UNIT, OUR_UNIT, FakeHost
from tests.fakes import Call
from tests.model_metadata import StaticMetadata

SETTINGS = Settings.model_validate({"host": {"address": "10.0.0.1"}})
CATALOG = load_catalog()
ENV_FILE = "/opt/asoba-inference/service.env"
UNIT_FILE = f"/etc/systemd/system/{OUR_UNIT}"
CURRENT = "/var/lib/model-deployer/current.json"


class Events(SilentReporter):
    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self.infos: list[str] = []

    def step(self, event: str, name: str) -> None:
        self.steps.append((event, name))

    def info(self, message: str) -> None:
        self.infos.append(message)


def plan_for(host: FakeHost, name: str = "demo-tiny", catalog: Catalog = CATALOG) -> Plan:
    return make_plan(
        name,
        settings=SETTINGS,
        catalog=catalog,
        executor=host,
        metadata=StaticMetadata({}, bucket=catalog.bucket),
    ).plan


def deploy(
    host: FakeHost,
    tmp_path: Path,
    *,
    plan: Plan | None = None,
    catalog: Catalog = CATALOG,
    checked: list[tuple[str, str]] | None = None,
) -> tuple[Deployment, Events]:
    plan = plan or plan_for(host, catalog=catalog)
    wheel = tmp_path / "model_deployer-0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    events = Events()
    deployment = Deployment(
        plan=plan,
        spec=catalog.get(plan.model),
        catalog=catalog,
        settings=SETTINGS,
        executor=host,
        check_source=lambda bucket, prefix: (checked if checked is not None else []).append(
            (bucket, prefix)
        ),
        build_code=lambda ident: wheel,
        code_id=lambda: "c0de",
        reporter=events,
    )
    return deployment, events


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")


def ran(events: Events) -> list[str]:
    return [name for event, name in events.steps if event == "done"]


def test_a_deploy_runs_the_plans_steps_and_records_the_release(
    host: FakeHost, tmp_path: Path
) -> None:
    checked: list[tuple[str, str]] = []
    deployment, events = deploy(host, tmp_path, checked=checked)
    result = deployment.run()
    assert result.outcome == "deployed" and result.release == 1
    assert checked == [(CATALOG.bucket, "models/demo-tiny/")]
    # One list: what the plan shows is what ran, in its order.
    assert ran(events) == [s.name for s in deployment.plan.steps]
    assert host.units[OUR_UNIT].active and host.units[OUR_UNIT].enabled
    assert host.units[FLUX_UNIT].active  # beside Flux: untouched
    # The service runs as its own system account, made by the deploy, and owns its env file.
    assert "asoba-inference" in host.users
    (useradd,) = [c.argv for c in host.calls if c.argv[0] == "useradd"]
    assert "--system" in useradd and useradd[-1] == "asoba-inference"
    assert "User=asoba-inference" in (host.read(UNIT_FILE) or "")
    assert "ASOBA_MODEL_NAME=demo-tiny" in (host.read(ENV_FILE) or "")
    record = json.loads(host.read(CURRENT) or "{}")
    assert record["model"] == "demo-tiny" and record["number"] == 1
    assert record["code_id"] == "c0de" and record["venv"].endswith("/venvs/c0de")
    assert (host.path(CURRENT).stat().st_mode & 0o777) == 0o644  # the probe reads it
    assert not host.path("/var/lib/model-deployer/lock").exists()  # released
    audit = (host.read("/var/lib/model-deployer/audit.log") or "").splitlines()
    assert [json.loads(line)["outcome"] for line in audit] == ["deployed"]


def test_the_same_plan_again_changes_nothing(host: FakeHost, tmp_path: Path) -> None:
    deploy(host, tmp_path)[0].run()
    unit_before = host.read(UNIT_FILE)
    host.calls.clear()
    deployment, events = deploy(host, tmp_path)
    result = deployment.run()
    assert result.outcome == "unchanged" and result.release is None
    skipped = [name for event, name in events.steps if event == "skip"]
    assert skipped == ["render-unit", "start", "write-discovery-env"]
    assert host.changes() == []  # no systemctl start/stop/enable/disable
    assert host.read(UNIT_FILE) == unit_before
    assert json.loads(host.read(CURRENT) or "{}")["number"] == 1
    assert "nothing to do" in " ".join(events.infos)


def is_step(verb: str, unit: str = OUR_UNIT) -> object:
    return lambda call: call.argv[:2] == ("systemctl", verb) and call.argv[-1] == unit


@pytest.mark.parametrize(
    ("fault", "failed_at", "undone"),
    [
        (lambda c: c.argv[0] == "mv" and c.argv[-1] == UNIT_FILE, "render-unit", []),
        (is_step("restart"), "start", ["render-unit"]),
        (FakeHost.is_health_wait, "wait-healthy", ["start", "render-unit"]),
    ],
    ids=["render-unit", "start", "wait-healthy"],
)
def test_a_failed_step_undoes_exactly_the_steps_before_it(
    host: FakeHost, tmp_path: Path, fault: object, failed_at: str, undone: list[str]
) -> None:
    deploy(host, tmp_path)[0].run()  # a first release is running
    first_unit, first_env = host.read(UNIT_FILE), host.read(ENV_FILE)
    host.serving = None
    plan = plan_for(host, "demo-tiny")
    # A different deploy: another key means other files, so the switch runs.
    deployment, _ = deploy(host, tmp_path, plan=plan)
    deployment.api_key = "another-key"
    host.fail_on(lambda call: fault(host, call) if failed_at == "wait-healthy" else fault(call))  # type: ignore[operator]
    with pytest.raises(DeployFailed) as caught:
        deployment.run()
    error = caught.value
    assert (error.step, error.undone, error.undo_errors) == (failed_at, undone, [])
    assert error.journal == host.journal
    # The previous release is back: its files, and it is running.
    assert host.read(UNIT_FILE) == first_unit and host.read(ENV_FILE) == first_env
    assert host.units[OUR_UNIT].active
    assert json.loads(host.read(CURRENT) or "{}")["number"] == 1
    assert not host.path("/var/lib/model-deployer/lock").exists()
    audit = (host.read("/var/lib/model-deployer/audit.log") or "").splitlines()
    assert json.loads(audit[-1])["outcome"] == "failed"


def test_a_failed_first_deploy_leaves_no_unit_and_restores_parked_flux(
    host: FakeHost, tmp_path: Path
) -> None:
    catalog = CATALOG
    deployment, _ = deploy(host, tmp_path)
    plan = deployment.plan.model_copy(update={"stop_flux": True, "action": "replace"})
    steps = list(plan.steps)
    index = next(i for i, s in enumerate(steps) if s.name == "start")
    stop_flux = steps[index].model_copy(update={"name": "stop-flux", "params": {}})
    plan = plan.model_copy(update={"steps": [*steps[:index], stop_flux, *steps[index:]]})
    deployment, _ = deploy(host, tmp_path, plan=plan, catalog=catalog)
    host.serving = "nobody"
    with pytest.raises(DeployFailed) as caught:
        deployment.run()
    assert caught.value.undone == ["start", "stop-flux", "render-unit"]
    assert host.read(UNIT_FILE) is None and host.read(ENV_FILE) is None
    assert not host.units[OUR_UNIT].active and not host.units[OUR_UNIT].enabled
    assert host.units[FLUX_UNIT].active and host.units[FLUX_UNIT].enabled
    assert host.read(CURRENT) is None


def test_failures_before_the_switch_raise_as_themselves_and_change_nothing(
    host: FakeHost, tmp_path: Path
) -> None:
    deployment, events = deploy(host, tmp_path)
    host.units[FLUX_UNIT].active = False  # the host moved since the plan
    with pytest.raises(PlanOutdated):
        deployment.run()
    assert ("done", "lock") in events.steps and not any(e == "undo" for e, _ in events.steps)
    assert host.changes() == [] and host.read(UNIT_FILE) is None

    def missing(bucket: str, prefix: str) -> None:
        raise ModelSourceError(f"s3://{bucket}/{prefix}: not found")

    deployment, events = deploy(host, tmp_path)
    deployment.check_source = missing
    with pytest.raises(ModelSourceError):
        deployment.run()
    assert events.steps == []  # refused before the lock: the host was not touched
    assert not host.path("/var/lib/model-deployer/lock").exists()


def test_a_held_lock_stops_the_deploy_before_anything_changes(
    host: FakeHost, tmp_path: Path
) -> None:
    other = LockInfo("bob", "laptop", 1, "now", "deploy-model x", machine_id="id-laptop")
    held = HostLock(host, "/var/lib/model-deployer", info=other, machine_id="id-laptop")
    held.acquire()
    deployment, events = deploy(host, tmp_path)
    with pytest.raises(LockHeld):
        deployment.run()
    assert events.steps == [("start", "lock")]
    assert host.read(UNIT_FILE) is None and host.changes() == []
    assert host.path("/var/lib/model-deployer/lock").is_dir()  # still the other's


@pytest.mark.parametrize("when", ["after-pull", "before-start", "after-start"])
def test_the_bootstrap_hook_runs_where_the_plan_put_it(
    host: FakeHost, tmp_path: Path, when: str
) -> None:
    spec = CATALOG.get("demo-tiny")
    hooked = spec.model_copy(
        update={
            "bootstrap": Bootstrap(
                script="scripts/bootstrap/bootstrap_mistral_deployment.sh", step=when
            )
        }
    )
    catalog = CATALOG.model_copy(update={"models": {**CATALOG.models, "demo-tiny": hooked}})
    deployment, events = deploy(host, tmp_path, catalog=catalog)
    deployment.run()
    names = ran(events)
    assert names == [s.name for s in deployment.plan.steps]
    anchor = {"after-pull": "pull-weights", "before-start": "start", "after-start": "wait-healthy"}
    offset = -1 if when == "before-start" else 1
    assert names.index("bootstrap") == names.index(anchor[when]) + offset
    (call,) = [c for c in host.calls if c.argv[:2] == ("sh", "-s")]
    assert isinstance(call, Call) and call.env is not None
    assert call.env["MODEL_NAME"] == "demo-tiny"
    assert call.env["MODEL_DIR"].startswith("/opt/models/demo-tiny/")


def test_existing_directories_are_not_re_owned(host: FakeHost, tmp_path: Path) -> None:
    """Only directories the deploy makes get its owner and mode; the operator's stay theirs."""
    for existing in ("/opt/models", "/var/lib/model-deployer"):
        host.path(existing).mkdir(parents=True)
    deploy(host, tmp_path)[0].run()
    made = [c.argv[-1] for c in host.calls if c.argv[:2] == ("install", "-d")]
    assert "/opt/models" not in made and "/var/lib/model-deployer" not in made
    owners = {
        c.argv[-1]: c.argv[c.argv.index("-o") + 1]
        for c in host.calls
        if c.argv[:2] == ("install", "-d")
    }
    assert owners["/opt/models/demo-tiny"] == SETTINGS.host.user  # the pull writes there
    assert owners["/opt/asoba-inference"] == "root"


def test_a_failed_record_keeps_the_healthy_deploy(host: FakeHost, tmp_path: Path) -> None:
    """The record is written once the service is up: failing there raises as itself and
    undoes nothing (the new service keeps serving)."""
    deployment, events = deploy(host, tmp_path)
    host.fail_on(lambda call: call.argv[:2] == ("cp", "-a"))  # saving the env file's copy
    with pytest.raises(RemoteCommandFailed):
        deployment.run()
    assert not any(event == "undo" for event, _ in events.steps)
    assert host.units[OUR_UNIT].active and host.read(UNIT_FILE) is not None
    assert not host.path("/var/lib/model-deployer/lock").exists()


def vllm_plan(host: FakeHost, package: str = "vllm") -> Plan:
    settings = SETTINGS.model_copy(
        update={"install": SETTINGS.install.model_copy(update={"vllm_package": package})}
    )
    return make_plan(
        "demo-tiny",
        settings=settings,
        catalog=CATALOG,
        executor=host,
        metadata=StaticMetadata({}, bucket=CATALOG.bucket),
        flags=PlanFlags(engine="vllm"),
    ).plan


def env_of(host: FakeHost) -> dict[str, str]:
    text = host.read(ENV_FILE) or ""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_a_vllm_plan_installs_its_engine_and_renders_the_plans_numbers(
    host: FakeHost, tmp_path: Path
) -> None:
    plan = vllm_plan(host)
    assert plan.engine == "vllm" and plan.service and plan.service.vllm
    vllm = plan.service.vllm
    deployment, events = deploy(host, tmp_path, plan=plan)
    assert deployment.run().outcome == "deployed"
    assert ran(events) == [s.name for s in plan.steps] and "install-engine" in ran(events)
    venv = engine_venv_dir(SETTINGS, "vllm")
    assert venv.startswith("/opt/asoba-inference/engines/vllm-")
    assert host.path(f"{venv}/.complete").exists()
    # Its own venv: never the host's torch through the system site-packages.
    (made,) = [c.argv for c in host.calls if c.argv[1:3] == ("-m", "venv") and venv in c.argv]
    assert "--system-site-packages" not in made
    (pip,) = [c.argv for c in host.calls if c.argv[0] == f"{venv}/bin/python" and "pip" in c.argv]
    assert "--require-hashes" in pip and "--no-deps" in pip
    env = env_of(host)
    assert env["ASOBA_BACKEND"] == "vllm"
    assert env["ASOBA_VLLM_PYTHON"] == f"{venv}/bin/python"
    assert float(env["ASOBA_GPU_MEMORY_UTILIZATION"]) == vllm.gpu_memory_utilization
    assert int(env["ASOBA_MAX_NUM_SEQS"]) == vllm.max_num_seqs
    assert int(env["ASOBA_MAX_MODEL_LEN"]) == vllm.max_model_len
    assert int(env["ASOBA_TENSOR_PARALLEL_SIZE"]) == vllm.tensor_parallel_size
    assert "ASOBA_KV_CACHE_BYTES" not in env  # vLLM sizes its cache from its claim on a GPU
    assert env["ASOBA_VLLM_TOOL_CALL_PARSER"] == CATALOG.get("demo-tiny").tool_call_parser
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, vllm.gpu_indices))
    unit_text = host.read(UNIT_FILE) or ""
    assert "SocketBindAllow=tcp:32768-60999" in unit_text  # its workers' loopback ports
    assert "RuntimeDirectory=asoba-inference" in unit_text

    # The same plan again: the engine venv is there, nothing changes.
    host.calls.clear()
    again, _ = deploy(host, tmp_path, plan=vllm_plan(host))
    assert again.run().outcome == "unchanged"
    assert not [c for c in host.calls if c.argv[1:3] == ("-m", "pip")]
    assert host.changes() == []


def test_the_cpu_build_gets_the_plans_kv_cache_and_no_gpu_list(
    host: FakeHost, tmp_path: Path
) -> None:
    plan = vllm_plan(host, "vllm-cpu")
    assert plan.service and plan.service.vllm
    deploy(host, tmp_path, plan=plan)[0].run()
    env = env_of(host)
    assert env["ASOBA_VLLM_PYTHON"].startswith("/opt/asoba-inference/engines/vllm-cpu-")
    assert int(env["ASOBA_KV_CACHE_BYTES"]) == plan.service.vllm.kv_least_bytes
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_switching_back_to_transformers_leaves_no_vllm_settings(
    host: FakeHost, tmp_path: Path
) -> None:
    deploy(host, tmp_path, plan=vllm_plan(host))[0].run()
    assert env_of(host)["ASOBA_BACKEND"] == "vllm"
    back, _ = deploy(host, tmp_path)
    assert back.run().outcome == "deployed"
    env = env_of(host)
    assert "ASOBA_BACKEND" not in env  # the server's default engine
    assert not [k for k in env if "VLLM" in k or k in ("CUDA_VISIBLE_DEVICES",)]
    assert "tcp:32768-60999" not in (host.read(UNIT_FILE) or "")
