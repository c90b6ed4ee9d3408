"""Rollback, undeploy and status on a host in a directory (``tests.fake_host``), after real
deploys through ``deployer.apply``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployer.errors import DeployError
from deployer.operations import rollback, service_status, undeploy
from tests.fake_host import FLUX_UNIT, OUR_UNIT, FakeHost
from tests.unit.test_apply import CURRENT, ENV_FILE, SETTINGS, UNIT_FILE, deploy, plan_for


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")


def two_releases(host: FakeHost, tmp_path: Path) -> tuple[str | None, str | None]:
    """Release 1 (no key), then release 2 (a key): returns release 1's env file and unit."""
    deploy(host, tmp_path)[0].run()
    first = host.read(ENV_FILE), host.read(UNIT_FILE)
    deployment, _ = deploy(host, tmp_path, plan=plan_for(host))
    deployment.api_key = "second-key"
    deployment.run()
    assert json.loads(host.read(CURRENT) or "{}")["number"] == 2
    return first


def test_rollback_puts_the_previous_release_back(host: FakeHost, tmp_path: Path) -> None:
    env, unit = two_releases(host, tmp_path)
    asked: list[list[str]] = []
    target = rollback(host, SETTINGS, confirm=asked.append)
    assert target.number == 1
    assert asked == [["replaces demo-tiny (release #2) with release #1 (demo-tiny)"]]
    assert host.read(ENV_FILE) == env and host.read(UNIT_FILE) == unit
    assert "second-key" not in (host.read(ENV_FILE) or "")
    record = json.loads(host.read(CURRENT) or "{}")
    assert record["number"] == 1 and record["model"] == "demo-tiny"
    assert host.units[OUR_UNIT].active
    assert not host.path("/var/lib/model-deployer/lock").exists()


def test_a_failed_rollback_keeps_the_current_release(host: FakeHost, tmp_path: Path) -> None:
    two_releases(host, tmp_path)
    env, unit = host.read(ENV_FILE), host.read(UNIT_FILE)
    host.fail_on(FakeHost.is_health_wait.__get__(host))
    with pytest.raises(DeployError, match="rollback to #1 failed at wait-healthy"):
        rollback(host, SETTINGS)
    assert host.read(ENV_FILE) == env and host.read(UNIT_FILE) == unit
    assert json.loads(host.read(CURRENT) or "{}")["number"] == 2
    assert host.units[OUR_UNIT].active


def test_rollback_needs_a_previous_release(host: FakeHost, tmp_path: Path) -> None:
    deploy(host, tmp_path)[0].run()
    with pytest.raises(DeployError, match="no previous release"):
        rollback(host, SETTINGS)


def test_undeploy_removes_the_service_and_only_recorded_models(
    host: FakeHost, tmp_path: Path
) -> None:
    deploy(host, tmp_path)[0].run()
    record = json.loads(host.read(CURRENT) or "{}")
    other = host.path("/opt/models/someone-elses/v1")
    other.mkdir(parents=True)
    host.units[FLUX_UNIT].active = False  # e.g. stopped by hand
    asked: list[list[str]] = []
    result = undeploy(host, SETTINGS, purge_models=True, confirm=asked.append)
    assert asked == [[f"stops and removes {OUR_UNIT}", f"deletes {record['model_path']}"]]
    assert host.read(UNIT_FILE) is None and host.read(CURRENT) is None
    assert not host.path("/opt/asoba-inference").exists()
    assert not host.path(record["model_path"]).exists() and other.is_dir()
    assert not host.units[OUR_UNIT].active and not host.units[OUR_UNIT].enabled
    assert host.units[FLUX_UNIT].active and result.flux == "active"
    assert CURRENT in result.removed and UNIT_FILE in result.removed
    # Kept releases stay for the record; a second undeploy is fine and removes nothing new.
    assert host.path("/var/lib/model-deployer/releases/1.json").is_file()
    again = undeploy(host, SETTINGS)
    assert again.removed == ["/opt/asoba-inference"]
    audit = (host.read("/var/lib/model-deployer/audit.log") or "").splitlines()
    assert [json.loads(line)["command"] for line in audit][-2:] == ["undeploy", "undeploy"]


def test_status_reports_the_running_release(host: FakeHost, tmp_path: Path) -> None:
    deploy(host, tmp_path)[0].run()
    status = service_status(host, SETTINGS)
    assert (status.model, status.port, status.health) == ("demo-tiny", 8001, "ok")
    assert status.code_id == "c0de" and status.state == "active/running"


def test_a_failed_rollback_of_a_crashed_service_leaves_it_enabled_and_restarted(
    host: FakeHost, tmp_path: Path
) -> None:
    two_releases(host, tmp_path)
    host.units[OUR_UNIT].active = False  # the current release crashed
    host.calls.clear()
    host.fail_on(FakeHost.is_health_wait.__get__(host))
    with pytest.raises(DeployError, match="failed at wait-healthy"):
        rollback(host, SETTINGS)
    assert host.units[OUR_UNIT].enabled  # a reboot still brings it up
    restarts = [c for c in host.changes() if c[1] == "restart"]
    assert len(restarts) == 2  # the rollback's start, then the current release's again


def test_rolling_back_to_a_release_recorded_by_the_old_schema(
    host: FakeHost, tmp_path: Path
) -> None:
    two_releases(host, tmp_path)
    old = json.loads(host.read("/var/lib/model-deployer/releases/1.json") or "{}")
    state_keys = ("schema", "model", "revision", "port", "quantization", "flux_stopped")
    legacy = {
        "model": old["model"],
        "revision": old["revision"],
        "model_path": old["model_path"],
        "port": old["port"],
        "quantization": old["quantization"],
        "service_name": old["service"],
        "unit_text": old["unit_text"],
        "number": 1,
        "time": old["time"],
        "operator": "",
        "env_file": old["env_file"],
        "extra": {**{k: old[k] for k in state_keys}, "venv": old["venv"]},
    }
    host.path("/var/lib/model-deployer/releases/1.json").write_text(json.dumps(legacy))
    target = rollback(host, SETTINGS)
    assert target.venv == old["venv"] and target.service_name == "asoba-inference.service"
    record = json.loads(host.read(CURRENT) or "{}")
    assert "extra" not in record and record["number"] == 1 and record["venv"] == old["venv"]


def test_rollback_after_undeploy_refuses_without_the_release_venv(
    host: FakeHost, tmp_path: Path
) -> None:
    """undeploy removes the venvs but keeps the release records: a rollback to one of them
    says so before changing anything, instead of starting a unit on a missing venv."""
    two_releases(host, tmp_path)
    undeploy(host, SETTINGS)
    changes = host.changes()
    with pytest.raises(DeployError, match=r"release #2's venv .* is no longer on the host"):
        rollback(host, SETTINGS)
    assert host.changes() == changes  # no unit was started or stopped
    assert not host.path(ENV_FILE).exists() and not host.path(UNIT_FILE).exists()
    assert not host.units[OUR_UNIT].active
    assert not host.path("/var/lib/model-deployer/lock").exists()
