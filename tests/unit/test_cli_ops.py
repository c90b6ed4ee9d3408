"""``model-deployer`` subcommands through Click's runner, on a host in a directory: ``--json``
on every command, the group's options after the subcommand, ``models`` and ``NO_COLOR``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from deployer import cli_ops
from deployer.core import Core
from tests.fake_host import FLUX_UNIT, FakeHost
from tests.unit.test_apply import deploy, plan_for


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    config = tmp_path / "model-deployer.toml"
    config.write_text('[host]\naddress = "10.0.0.1"\n')
    monkeypatch.setenv("MODEL_DEPLOYER_CONFIG", str(config))
    monkeypatch.delenv("NO_COLOR", raising=False)
    return FakeHost(tmp_path / "host")


def ops(host: FakeHost, *args: str, **kwargs: Any) -> Result:
    def open_host(settings: Any, *, trust_new_host_key: bool) -> FakeHost:
        host.opened = (settings.host.address, trust_new_host_key)  # type: ignore[attr-defined]
        return host

    return CliRunner().invoke(cli_ops.main, list(args), obj=Core(open_host=open_host), **kwargs)


def test_models_lists_the_disk_and_prune_keeps_what_releases_need(
    host: FakeHost, tmp_path: Path
) -> None:
    deploy(host, tmp_path)[0].run()
    stale = host.path("/opt/models/demo-tiny/old-revision")
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    host.path("/opt/models/demo-tiny/.staging-1").mkdir()  # a pull's own: never listed
    result = ops(host, "models", "--json")
    assert result.exit_code == 0, result.output
    found = {m["revision"]: m for m in json.loads(result.stdout)}
    live_path = json.loads(host.read("/var/lib/model-deployer/current.json") or "{}")["model_path"]
    assert set(found) == {"old-revision", live_path.rsplit("/", 1)[1]}
    assert found["old-revision"]["size_bytes"] >= 1000
    assert not found["old-revision"]["live"] and not found["old-revision"]["kept"]
    live = next(m for m in found.values() if m["live"])
    assert live["kept"]
    result = ops(host, "models", "--prune", "--json", "--yes")
    assert result.exit_code == 0, result.output
    assert [m["path"] for m in json.loads(result.stdout)["removed"]] == [
        "/opt/models/demo-tiny/old-revision"
    ]
    assert not stale.exists() and host.path(live["path"]).is_dir()
    assert "prunable" not in ops(host, "models").stdout


def test_prune_without_consent_changes_nothing(host: FakeHost, tmp_path: Path) -> None:
    stale = host.path("/opt/models/demo-tiny/old-revision")
    stale.mkdir(parents=True)
    result = ops(host, "models", "--prune", env={"MODEL_DEPLOYER_YES": ""})
    assert result.exit_code == 2 and stale.is_dir()
    assert "deletes /opt/models/demo-tiny/old-revision" in result.stderr


def test_every_command_answers_json(host: FakeHost, tmp_path: Path) -> None:
    deploy(host, tmp_path)[0].run()
    second, _ = deploy(host, tmp_path, plan=plan_for(host))
    second.api_key = "k2"
    second.run()
    status = json.loads(ops(host, "status", "--json").stdout)
    assert status["model"] == "demo-tiny" and status["health"] == "ok"
    rolled = ops(host, "rollback", "--json", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert json.loads(rolled.stdout) == {
        "release": 1,
        "model": "demo-tiny",
        "revision": status["revision"],
        "port": 8001,
        "quantization": "none",
    }
    flux = json.loads(ops(host, "flux", "status", "--json").stdout)
    assert flux == {"unit": FLUX_UNIT, "action": "status", "state": "active"}
    assert json.loads(ops(host, "unlock", "--json").stdout) == {"broken": None}
    gone = json.loads(ops(host, "undeploy", "--json", "--yes").stdout)
    assert "/etc/systemd/system/asoba-inference.service" in gone["removed"]
    assert gone["flux"] == "active"


def test_group_options_work_after_the_subcommand(host: FakeHost, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[host]\naddress = "10.0.0.2"\n')
    result = ops(host, "status", "--config", str(other), "--trust-new-host-key", "--json")
    assert result.exit_code == 0, result.output
    assert host.opened == ("10.0.0.2", True)  # type: ignore[attr-defined]
    ops(host, "--config", str(other), "status", "--json")
    assert host.opened == ("10.0.0.2", False)  # type: ignore[attr-defined]


def test_no_color_is_honoured(host: FakeHost, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    colored = ops(host, "status", "--config", missing, color=True)
    assert colored.exit_code == 2 and "\x1b[" in colored.stderr
    plain = ops(host, "status", "--config", missing, color=True, env={"NO_COLOR": "1"})
    assert plain.exit_code == 2 and "\x1b[" not in plain.stderr
    assert plain.stderr.startswith("error: ")
