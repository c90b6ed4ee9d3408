"""``deploy-model`` planning commands, through Click's runner with a fake host and metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner, Result

from deployer import cli
from deployer.catalog import load_catalog
from deployer.core import Core
from deployer.errors import AuthError, CommandResult, ConnectError
from tests import model_shapes as ms
from tests.fakes import FakeExecutor, is_probe, probe_answer, probe_json
from tests.model_metadata import StaticMetadata, meta_from_tensors

CATALOG = load_catalog()
METAS = {
    n: meta_from_tensors(CATALOG.models[n], ms.config(n), ms.model_shards(n)) for n in ms.MODELS
}


class Host:
    """What the patched core sees: one fake executor per CLI run, and the metadata."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = probe_json()
        self.error: BaseException | None = None
        self.metas = dict(METAS)
        self.executors: list[FakeExecutor] = []
        self.env_file: str | None = None  # the host's service.env; None: there is none

    def open_host(self, settings: Any, *, trust_new_host_key: bool = False) -> FakeExecutor:
        fake = FakeExecutor(target=f"ubuntu@{settings.host.address}:22")
        fake.on(is_probe, self.error or probe_answer(self.facts))
        env = self.env_file
        fake.on(
            ["cat", "--", "/opt/asoba-inference/service.env"],
            CommandResult("cat", 1, "", "No such file")
            if env is None
            else CommandResult("cat", 0, env, ""),
        )
        self.executors.append(fake)
        return fake

    def s3_metadata(self, settings: Any, catalog: Any) -> StaticMetadata:
        return StaticMetadata(self.metas, bucket=catalog.bucket)

    def core(self) -> Core:
        return Core(
            open_host=self.open_host,
            open_metadata=self.s3_metadata,
            deployment=FakeDeployment,
            check_source=lambda settings: lambda bucket, prefix: None,
        )


# The core the CLI runs on in each test (Click's context object): the fake host's, else the
# real one.
CORES: list[Core] = []


@pytest.fixture(autouse=True)
def _fresh_core() -> None:
    CORES.clear()


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Host:
    import os

    for key in list(os.environ):
        if key.startswith("MODEL_DEPLOYER_") or key.startswith("AWS_"):
            monkeypatch.delenv(key)
    config = tmp_path / "model-deployer.toml"
    config.write_text('[host]\naddress = "10.9.9.9"\n')
    monkeypatch.setenv("MODEL_DEPLOYER_CONFIG", str(config))
    fake = Host()
    CORES[:] = [fake.core()]
    FakeDeployment.calls = []
    FakeDeployment.error = None
    return fake


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, list(args), env=env, obj=CORES[-1] if CORES else None)


def test_dry_run_renders_the_plan(host: Host) -> None:
    result = run("qwen3-14b", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "Plan for qwen3-14b on 10.9.9.9",
        "REPLACE",
        "will be STOPPED",
        "8000",
        "AWQ 4-bit, pre-quantized from qwen3-14b-awq",
        "Memory",
        "headroom",
        "after deploy",
        "Why",
        "http://10.9.9.9:8000/v1/chat/completions",
        "Steps apply would run",
        "pull-weights",
        "stop-flux",
        "wait-healthy",
        "dry run: nothing was changed on the host",
    ):
        assert text in out, text
    assert result.stderr == ""
    assert len(host.executors) == 1 and host.executors[0].closed
    # The facts in one round trip (the probe), then the env file's API key (sudo: 0600).
    calls = host.executors[0].calls
    assert len(calls) == 2 and calls[1].argv == ("cat", "--", "/opt/asoba-inference/service.env")


def test_json_plan(host: Host) -> None:
    result = run("mistral_iac_generation", "--dry-run", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    for key in (
        "model",
        "action",
        "stop_flux",
        "port",
        "quantization",
        "need_gb",
        "gpu_free_gb",
        "reasons",
        "steps",
        "facts",
    ):
        assert key in data
    assert (data["action"], data["stop_flux"], data["port"], data["quantization"]) == (
        "coexist",
        False,
        8001,
        "none",
    )
    assert [s["name"] for s in data["steps"]][:3] == ["lock", "re-inspect", "install-venv"]
    assert data["facts"]["flux_state"] == "active"


def test_force_quantize_flag_with_and_without_value(host: Host) -> None:
    data = json.loads(run("deepseek-r1-8b", "--dry-run", "--json", "--force-quantize").stdout)
    assert data["quantization"] == "bnb-4bit"
    data = json.loads(
        run("deepseek-r1-8b", "--force-quantize", "8bit", "--dry-run", "--json").stdout
    )
    assert data["quantization"] == "bnb-8bit"
    bad = run("deepseek-r1-8b", "--force-quantize", "2bit", "--dry-run")
    assert bad.exit_code == 2 and "2bit" in bad.output


def test_refusal_prints_the_plan_and_exits_4(host: Host) -> None:
    host.facts = probe_json(other_gpu_mib=20000)
    result = run("qwen3-coder-30b", "--dry-run", "--json")
    assert result.exit_code == 4
    assert json.loads(result.stdout)["action"] == "refuse"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: qwen3-coder-30b: nothing fits: the smallest option")
    rich = run("qwen3-coder-30b", "--dry-run")
    assert rich.exit_code == 4 and "REFUSE" in rich.stdout


def test_unknown_model_suggests_and_never_connects(host: Host) -> None:
    result = run("qwen3-14", "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown model 'qwen3-14' (did you mean 'qwen3-14b' or 'qwen3-14b-awq' or "
        "'qwen3-coder-30b'?) "
        "(`deploy-model --list` shows the catalog)"
    ]
    assert host.executors == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectError("cannot reach ubuntu@10.9.9.9:22: [Errno 113] No route to host"),
        AuthError(
            "SSH authentication failed for ubuntu@10.9.9.9:22: bad key", hint="check host.key_file"
        ),
    ],
)
def test_unreachable_or_refused_host_exits_3_with_one_line(host: Host, error: Exception) -> None:
    host.error = error
    result = run("demo-tiny", "--dry-run", "--json")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.output and result.stdout == ""


def test_unexpected_errors_are_one_line_unless_debugging(host: Host) -> None:
    host.error = RuntimeError("kaboom")
    result = run("demo-tiny", "--dry-run")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: unexpected RuntimeError: kaboom (rerun with --debug for details)"
    )
    debug = run("demo-tiny", "--dry-run", "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "kaboom" in debug.stderr
    env_debug = run("demo-tiny", "--dry-run", env={"MODEL_DEPLOYER_DEBUG": "1"})
    assert env_debug.exit_code == 1 and "Traceback" in env_debug.stderr


def test_no_host_configured(host: Host, tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    result = run("demo-tiny", "--dry-run", "--config", str(empty))
    assert result.exit_code == 2 and "no target host configured" in result.stderr


def test_bad_config_is_exit_2(host: Host, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\ncoexist_max = 3\n")
    result = run("demo-tiny", "--dry-run", "--config", str(bad))
    assert result.exit_code == 2
    assert "policy.coexist_max: unknown key" in result.stderr


def test_list_needs_no_host(host: Host, tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    result = run("--list", "--config", str(empty))
    assert result.exit_code == 0
    for name in CATALOG.models:
        assert name in result.stdout
    assert host.executors == []


def test_name_required(host: Host) -> None:
    result = run("--dry-run")
    assert result.exit_code == 2 and "give a model NAME" in result.output


class FakeDeployment:
    """Stands in for ``deployer.apply.Deployment``: records what the CLI hands it."""

    calls: ClassVar[list[dict[str, Any]]] = []
    error: Exception | None = None

    def __init__(self, **kwargs: Any) -> None:
        FakeDeployment.calls.append(kwargs)

    def run(self) -> Any:
        from deployer.apply import ApplyResult

        if FakeDeployment.error is not None:
            raise FakeDeployment.error
        return ApplyResult(
            "deployed",
            "demo-tiny",
            8001,
            "/opt/models/demo-tiny/r1",
            3,
            {"status": "healthy"},
            12.5,
        )


@pytest.fixture
def deployment(host: Host) -> type[FakeDeployment]:
    """The deployment the CLI makes (``Core.deployment``) records what it is handed."""
    return FakeDeployment


def test_apply_hands_the_shown_plan_to_the_deployment(
    host: Host, deployment: type[FakeDeployment]
) -> None:
    result = run("demo-tiny", "--json", "--lock-wait", "30", "--force-unlock")
    assert result.exit_code == 0, result.output
    (call,) = deployment.calls
    assert call["plan"].model == "demo-tiny" and call["spec"].name == "demo-tiny"
    assert call["options"].lock_wait_s == 30.0 and call["options"].force_unlock
    assert call["executor"] is host.executors[0]
    out = json.loads(result.stdout)
    assert out["action"] == call["plan"].action
    assert out["apply"] == {
        "outcome": "deployed",
        "model": "demo-tiny",
        "port": 8001,
        "model_path": "/opt/models/demo-tiny/r1",
        "release": 3,
        "duration_s": 12.5,
        "status": {"status": "healthy"},
        "fetched_bytes": None,
    }
    assert host.executors[0].closed


def test_apply_failure_is_one_line_with_the_journal_shown(
    host: Host, deployment: type[FakeDeployment]
) -> None:
    from deployer.errors import DeployFailed

    deployment.error = DeployFailed(
        "deploy of demo-tiny failed at wait-healthy: boom; rolled back (start)",
        step="wait-healthy",
        undone=["start"],
        journal="Nov 23 service[1]: OSError: weights unreadable",
    )
    result = run("demo-tiny")
    assert result.exit_code == 1
    assert "weights unreadable" in result.stdout
    assert result.stderr.strip().splitlines() == [
        "error: deploy of demo-tiny failed at wait-healthy: boom; rolled back (start)"
    ]
    assert "Traceback" not in result.output


def test_secrets_never_reach_the_output(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    meta = host.metas.pop("deepseek-r1-8b")
    host.metas["deepseek-r1-8b"] = meta.model_copy(
        update={"notes": [f"endpoint said: signature mismatch for {secret}"]}
    )
    for args in (("--dry-run",), ("--dry-run", "--json")):
        result = run("deepseek-r1-8b", *args)
        assert result.exit_code == 0
        assert secret not in result.output
        assert "[REDACTED]" in result.output


def test_importing_the_cli_loads_no_heavy_modules() -> None:
    code = (
        "import sys, deployer.cli; "
        "print(sorted(m for m in ('boto3', 'botocore', 'torch', 'transformers', 'fabric', "
        "'paramiko', 'rich') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_help_is_fast_and_lists_the_flags() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for flag in ("--dry-run", "--json", "--force-quantize", "--config", "--list", "--debug"):
        assert flag in result.output


HOST_ENV = '# Written by model-deployer\nASOBA_PORT="8001"\nASOBA_API_KEY="host-key-123"\n'


def test_the_hosts_key_is_kept_when_the_operator_gives_none(
    host: Host, deployment: type[FakeDeployment]
) -> None:
    host.env_file = HOST_ENV
    result = run("demo-tiny", "--json")
    assert result.exit_code == 0, result.output
    assert deployment.calls[0]["options"].api_key == "host-key-123"
    out = json.loads(result.stdout)
    assert (out["auth"], out["auth_source"]) == ("on", "host")
    assert "host-key-123" not in result.output


def test_the_operators_key_replaces_the_hosts(host: Host, deployment: type[FakeDeployment]) -> None:
    host.env_file = HOST_ENV
    result = run("demo-tiny", env={"MODEL_DEPLOYER_API_KEY": "new-key"})
    assert result.exit_code == 0, result.output
    assert deployment.calls[0]["options"].api_key == "new-key"
    assert "auth: on (the key in MODEL_DEPLOYER_API_KEY)" in result.stdout


def test_turning_auth_off_needs_yes(host: Host, deployment: type[FakeDeployment]) -> None:
    host.env_file = HOST_ENV
    refused = run("demo-tiny", "--no-auth")
    assert refused.exit_code == 2 and not deployment.calls
    assert "removes the host's API key" in refused.stderr
    done = run("demo-tiny", "--no-auth", "--yes", "--json")
    assert done.exit_code == 0, done.output
    assert deployment.calls[0]["options"].api_key is None
    assert json.loads(done.stdout)["auth_source"] == "removed"


def test_no_key_anywhere_stays_off(host: Host, deployment: type[FakeDeployment]) -> None:
    result = run("demo-tiny", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["auth"] == "off" and not deployment.calls


def test_stopping_flux_needs_consent(host: Host, deployment: type[FakeDeployment]) -> None:
    """qwen3-14b replaces Flux on the g5: without a terminal and without --yes, nothing runs."""
    refused = run("qwen3-14b")
    assert refused.exit_code == 2 and not deployment.calls
    assert "deploying qwen3-14b stops flux-api.service: not confirmed" in refused.stderr
    assert run("qwen3-14b", "--yes").exit_code == 0 and len(deployment.calls) == 1
    assert run("qwen3-14b", env={"MODEL_DEPLOYER_YES": "1"}).exit_code == 0
    assert len(deployment.calls) == 2
    assert run("demo-tiny").exit_code == 0  # beside Flux: nothing to consent to


def test_consent_on_a_terminal() -> None:
    from deployer.consent import ConsentRequired, require

    asked: list[str] = []

    def answer(value: bool):  # type: ignore[no-untyped-def]
        def ask(question: str) -> bool:
            asked.append(question)
            return value

        return ask

    require(
        "undeploy", ["stops and removes x.service"], yes=False, interactive=True, ask=answer(True)
    )
    assert asked == ["undeploy stops and removes x.service. Go ahead?"]
    with pytest.raises(ConsentRequired, match="nothing was changed"):
        require("undeploy", ["stops x"], yes=False, interactive=True, ask=answer(False))
    require("undeploy", [], yes=False, interactive=False)  # nothing to consent to


def saved_plan(host: Host, tmp_path: Path, name: str = "demo-tiny") -> Path:
    result = run(name, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    path = tmp_path / "plan.json"
    path.write_text(result.stdout)
    return path


def test_a_saved_plan_is_applied_as_it_is(
    host: Host, deployment: type[FakeDeployment], tmp_path: Path
) -> None:
    path = saved_plan(host, tmp_path)
    shown = json.loads(path.read_text())
    host.facts = probe_json(flux_gpu_mib=13500)  # drifted, but the decision is the same
    result = run("--plan", str(path))
    assert result.exit_code == 0, result.output
    (call,) = deployment.calls
    assert call["plan"].plan_id == shown["plan_id"]
    assert call["plan"].facts.flux_gpu_mib == shown["facts"]["flux_gpu_mib"]  # the saved one


def test_a_saved_plan_is_refused_when_the_host_would_decide_otherwise(
    host: Host, deployment: type[FakeDeployment], tmp_path: Path
) -> None:
    path = saved_plan(host, tmp_path)
    host.facts = probe_json(flux_gpu_mib=22800)  # no room beside Flux any more
    result = run("--plan", str(path))
    assert result.exit_code == 4 and not deployment.calls
    assert 'action: "coexist" in the plan, "replace" now' in result.stderr


def test_an_edited_plan_is_refused(
    host: Host, deployment: type[FakeDeployment], tmp_path: Path
) -> None:
    path = saved_plan(host, tmp_path)
    data = json.loads(path.read_text())
    data["port"] = 9999
    path.write_text(json.dumps(data))
    result = run("--plan", str(path))
    assert result.exit_code == 2 and not deployment.calls
    assert "was edited" in result.stderr
    path.write_text("{not json")
    assert "not a plan" in run("--plan", str(path)).stderr
    path.write_text('{"port": ' + "9" * 5000 + "}")  # past Python's int digit limit
    result = run("--plan", str(path))
    assert result.exit_code == 2 and "not a plan (invalid JSON: Exceeds the limit" in result.stderr


def test_a_plan_from_other_code_is_refused(
    host: Host, deployment: type[FakeDeployment], tmp_path: Path
) -> None:
    from deployer.planner import Plan, with_code

    path = saved_plan(host, tmp_path)
    plan = Plan.model_validate(json.loads(path.read_text()))
    path.write_text(json.dumps(with_code(plan, "0" * 12, plan.lock_hash).to_json()))
    result = run("--plan", str(path))
    assert result.exit_code == 4 and not deployment.calls
    assert "the code or lock differ" in result.stderr


def test_debug_keeps_the_exit_code(host: Host, deployment: type[FakeDeployment]) -> None:
    from deployer.errors import LockHeld

    deployment.error = LockHeld("another deploy holds the host lock")
    plain = run("demo-tiny")
    traced = run("demo-tiny", "--debug")
    assert plain.exit_code == traced.exit_code == 5
    assert "Traceback" in traced.stderr and "Traceback" not in plain.stderr


def test_version_and_help(host: Host) -> None:
    assert run("--version").output.startswith("deploy-model, version ")
    text = run("--help").output
    assert "Examples:" in text and "Exit codes:" in text and "5 another" in text


def test_a_saved_plan_is_refused_when_auth_would_differ(
    host: Host, deployment: type[FakeDeployment], tmp_path: Path
) -> None:
    host.env_file = HOST_ENV
    path = saved_plan(host, tmp_path)
    assert json.loads(path.read_text())["auth"] == "on"
    host.env_file = None  # the host lost its key since the review
    result = run("--plan", str(path))
    assert result.exit_code == 4 and not deployment.calls
    assert 'auth: "on" in the plan, "off" now' in result.stderr


# --------------------------------------------------------------------------- --engine


def test_engine_flag_reaches_the_plan_and_its_json(host: Host) -> None:
    data = json.loads(run("demo-tiny", "--dry-run", "--json").stdout)
    assert (data["engine"], data["flags"]["engine"]) == ("transformers", None)
    data = json.loads(run("demo-tiny", "--engine", "vllm", "--dry-run", "--json").stdout)
    assert (data["engine"], data["flags"]["engine"]) == ("vllm", "vllm")
    assert data["engine_reason"] == "vllm: --engine vllm"
    assert data["service"]["vllm"]["tensor_parallel_size"] == 1
    assert "install-engine" in [s["name"] for s in data["steps"]]
    shown = run("deepseek-r1-8b", "--dry-run").stdout
    for text in ("engine", "vllm: 16-bit checkpoint (auto)", "vLLM GPU memory", "claim"):
        assert text in shown, text
    assert "off (no tool_call_parser)" in shown  # the catalog names none for it
    assert data["service"]["vllm"]["tool_call_parser"] == "hermes"  # demo-tiny's
    assert "hermes parser" in run("demo-tiny", "--engine", "vllm", "--dry-run").stdout


def test_a_bad_engine_is_clicks_one_line_error(host: Host) -> None:
    bad = run("demo-tiny", "--engine", "tgi", "--dry-run")
    assert bad.exit_code == 2 and not host.executors
    assert "Invalid value for '--engine'" in bad.output and "tgi" in bad.output
    assert "--engine" in run("--help").output


def test_a_saved_plan_keeps_its_engine(
    host: Host, deployment: type[FakeDeployment], tmp_path: Path
) -> None:
    result = run("demo-tiny", "--engine", "vllm", "--dry-run", "--json")
    path = tmp_path / "plan.json"
    path.write_text(result.stdout)
    result = run("--plan", str(path))
    assert result.exit_code == 0, result.output
    (call,) = deployment.calls
    assert call["plan"].engine == "vllm" and call["plan"].flags.engine == "vllm"
