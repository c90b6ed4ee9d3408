"""The tool writes, stops and removes only what it made: system directories are refused in the
config, and a unit it did not write is never touched (config, then the check on the host)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from deployer.config import Settings, load_settings
from deployer.errors import CommandResult, ConfigError, ForeignUnit
from deployer.operations import rollback, undeploy
from deployer.unit import UNIT_MARKER, foreign_unit, refuse_foreign_unit, render_unit
from tests.fakes import FakeExecutor
from tests.local_executor import LocalExecutor


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("service_dir", "/opt"),
        ("models_dir", "/"),
        ("state_dir", "/tmp"),
        ("models_dir", "/home/ubuntu"),
        ("service_dir", "/etc/asoba"),
        ("models_dir", "/usr/lib/models"),
        ("state_dir", "/var/lib"),
    ],
)
def test_system_directories_are_refused(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"remote.{key}: {value} is a system directory"):
        load_settings(config(tmp_path, f'[remote]\n{key} = "{value}"\n'), environ={})


def test_directories_of_their_own_are_fine(tmp_path: Path) -> None:
    s = load_settings(
        config(tmp_path, '[remote]\nmodels_dir = "/data/models"\nservice_dir = "/srv/asoba"\n'),
        environ={},
    )
    assert (s.remote.models_dir, s.remote.service_dir) == ("/data/models", "/srv/asoba")


def test_nested_directories_are_refused(tmp_path: Path) -> None:
    """Undeploy removes service_dir whole: it must not hold the models or the state."""
    text = '[remote]\nmodels_dir = "/opt/asoba-inference/models"\n'
    with pytest.raises(ConfigError, match="service_dir and models_dir must not be"):
        load_settings(config(tmp_path, text), environ={})


def test_flux_is_not_a_service_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="service_name must not be flux_service"):
        load_settings(config(tmp_path, '[remote]\nservice_name = "flux-api.service"\n'))


def host(load: str, fragment: str, file_text: str | None) -> FakeExecutor:
    fake = FakeExecutor()
    fake.on(["systemctl", "show"], f"LoadState={load}\nFragmentPath={fragment}\n")
    fake.on(
        ["cat"],
        CommandResult("cat", 1, "", "No such file")
        if file_text is None
        else CommandResult("cat", 0, file_text, ""),
    )
    return fake


def test_a_package_unit_is_foreign() -> None:
    s = Settings.model_validate({"remote": {"service_name": "ssh.service"}})
    fake = host("loaded", "/lib/systemd/system/ssh.service", None)
    assert "defined by /lib/systemd/system/ssh.service" in (foreign_unit(fake, s) or "")
    with pytest.raises(ForeignUnit, match=r"refusing to touch ssh\.service"):
        refuse_foreign_unit(fake, s)


def test_a_unit_file_someone_else_wrote_is_foreign() -> None:
    s = Settings()
    path = "/etc/systemd/system/asoba-inference.service"
    fake = host("loaded", path, "[Service]\nExecStart=/usr/bin/other\n")
    assert foreign_unit(fake, s) == f"{path} was not written by this tool"


def test_our_unit_and_no_unit_are_ours() -> None:
    s = Settings()
    ours = render_unit(s, model_name="demo")
    assert UNIT_MARKER in ours
    path = "/etc/systemd/system/asoba-inference.service"
    assert foreign_unit(host("loaded", path, ours), s) is None
    assert foreign_unit(host("not-found", "", None), s) is None
    assert "masked" in (foreign_unit(host("masked", "", None), s) or "")


class LockHereUnitsThere:
    """The host lock on a local state dir (a real one), systemd answered by ``units``."""

    def __init__(self, units: FakeExecutor) -> None:
        self.local = LocalExecutor()
        self.units = units
        self.target = "test"

    def run(self, argv: Sequence[str], **kw: Any) -> CommandResult:
        if argv[0] in ("systemctl", "test", "cat") and "lock" not in " ".join(argv):
            return self.units.run(argv, **kw)
        return self.local.run(argv, **kw)

    def close(self) -> None:
        pass


def test_undeploy_and_rollback_refuse_a_foreign_unit_before_touching_it(tmp_path: Path) -> None:
    s = Settings.model_validate(
        {"remote": {"service_name": "ssh.service", "state_dir": str(tmp_path / "state")}}
    )
    units = host("loaded", "/lib/systemd/system/ssh.service", None)
    executor = LockHereUnitsThere(units)
    with pytest.raises(ForeignUnit):
        undeploy(executor, s)  # type: ignore[arg-type]
    with pytest.raises(ForeignUnit):
        rollback(executor, s)  # type: ignore[arg-type]
    show = ("systemctl", "show", "--property=LoadState,FragmentPath", "--", "ssh.service")
    assert [c.argv for c in units.calls if c.argv[0] == "systemctl"] == [show, show]
    assert sum("lock" in " ".join(c.argv) for c in executor.local.calls) >= 4  # taken, released
    assert not (tmp_path / "state" / "lock").exists()


def test_flux_changes_take_the_host_lock(tmp_path: Path) -> None:
    from deployer.errors import LockHeld
    from deployer.lock import HostLock, LockInfo
    from deployer.operations import flux

    s = Settings.model_validate({"remote": {"state_dir": str(tmp_path / "state")}})
    units = FakeExecutor().on(["systemctl"], "active\n")
    executor = LockHereUnitsThere(units)
    other = LockInfo("bob", "box", 1, "now", "deploy-model x", machine_id="id-box")
    held = HostLock(LocalExecutor(), s.remote.state_dir, info=other, machine_id="id-box")
    held.acquire()
    with pytest.raises(LockHeld):
        flux(executor, s, "stop")  # type: ignore[arg-type]
    assert flux(executor, s, "status") == "active"  # reading needs no lock
    assert not any(c.argv[:2] == ("systemctl", "stop") for c in units.calls)
    held.release()
    assert flux(executor, s, "stop") == "active"  # type: ignore[arg-type]
    assert any(c.argv[:2] == ("systemctl", "stop") for c in units.calls)


def test_a_bad_key_file_is_a_config_error_before_connecting(tmp_path: Path) -> None:
    from deployer.make_plan import open_host

    key = tmp_path / "id"
    s = Settings.model_validate({"host": {"address": "192.0.2.1", "key_file": str(key)}})
    with pytest.raises(ConfigError, match="does not exist"):
        open_host(s)
    key.write_text("k")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644") as info:
        open_host(s)
    assert info.value.exit_code == 2 and info.value.hint == f"chmod 600 {key}"
    key.chmod(0o600)
    assert open_host(s).target == "ubuntu@192.0.2.1:22"
