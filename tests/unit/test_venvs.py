"""``model-deployer venvs`` on a host in a directory (``tests.fake_host``), after a real deploy:
which venvs the live and kept releases need, and that ``--prune`` deletes only the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployer.service_code import engine_venv_of
from deployer.venvs import prune_venvs, venvs_on_disk
from tests.fake_host import FakeHost
from tests.unit.test_apply import CURRENT, SETTINGS, deploy
from tests.unit.test_cli_ops import ops

SERVICE = "/opt/asoba-inference"
ENGINES = f"{SERVICE}/engines"


def make_venv(host: FakeHost, path: str, *, complete: bool = True, size: int = 100) -> None:
    where = host.path(path)
    (where / "bin").mkdir(parents=True)
    (where / "bin" / "python").write_bytes(b"x" * size)
    if complete:
        (where / ".complete").touch()


def name_engine(host: FakeHost, env_file: str, engine: str) -> None:
    """The env file (live or a release's copy) names ``engine``'s interpreter."""
    path = host.path(env_file)
    path.write_text(path.read_text() + f"ASOBA_VLLM_PYTHON={engine}/bin/python\n")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    config = tmp_path / "model-deployer.toml"  # for the CLI tests
    config.write_text('[host]\naddress = "10.0.0.1"\n')
    monkeypatch.setenv("MODEL_DEPLOYER_CONFIG", str(config))
    return FakeHost(tmp_path / "host")


def deployed(host: FakeHost, tmp_path: Path) -> dict:
    deploy(host, tmp_path)[0].run()
    return json.loads(host.read(CURRENT) or "{}")


def test_the_live_and_kept_venvs_stay_and_the_rest_are_pruned(
    host: FakeHost, tmp_path: Path
) -> None:
    release = deployed(host, tmp_path)
    live = release["venv"]
    make_venv(host, f"{SERVICE}/venvs/old-code-id", size=5000)
    make_venv(host, f"{SERVICE}/venvs/half-built", complete=False)
    make_venv(host, f"{ENGINES}/vllm-cpu-kept")
    make_venv(host, f"{ENGINES}/vllm-cpu-old")
    host.path(f"{SERVICE}/venvs/.tmp-not-a-venv").mkdir()  # not a name the deployer makes
    name_engine(host, release["env_file"], f"{ENGINES}/vllm-cpu-kept")

    found = {v.path: v for v in venvs_on_disk(host, SETTINGS)}
    assert set(found) == {
        live,
        f"{SERVICE}/venvs/old-code-id",
        f"{SERVICE}/venvs/half-built",
        f"{ENGINES}/vllm-cpu-kept",
        f"{ENGINES}/vllm-cpu-old",
    }
    assert found[live].live and found[live].kept and found[live].kind == "service"
    assert found[f"{ENGINES}/vllm-cpu-kept"].kept and not found[f"{ENGINES}/vllm-cpu-kept"].live
    assert found[f"{ENGINES}/vllm-cpu-kept"].kind == "engine"
    assert not found[f"{SERVICE}/venvs/half-built"].complete
    assert found[f"{SERVICE}/venvs/old-code-id"].size_bytes >= 5000
    prunable = {p for p, v in found.items() if v.prunable}
    assert prunable == {
        f"{SERVICE}/venvs/old-code-id",
        f"{SERVICE}/venvs/half-built",
        f"{ENGINES}/vllm-cpu-old",
    }

    asked: list[list[str]] = []
    gone = prune_venvs(host, SETTINGS, confirm=asked.append)
    assert {v.path for v in gone} == prunable
    assert len(asked[0]) == 3 and all(line.startswith("deletes ") for line in asked[0])
    for path in prunable:
        assert not host.path(path).exists()
    assert host.path(live).is_dir() and host.path(f"{ENGINES}/vllm-cpu-kept").is_dir()
    assert host.path(f"{SERVICE}/venvs/.tmp-not-a-venv").is_dir()
    assert not host.path("/var/lib/model-deployer/lock").exists()
    audit = host.read("/var/lib/model-deployer/audit.log") or ""
    assert json.loads(audit.splitlines()[-1])["command"] == "venvs --prune"
    assert prune_venvs(host, SETTINGS) == []  # nothing left to prune: nothing done


def test_the_live_engine_is_needed_even_when_no_release_names_it(
    host: FakeHost, tmp_path: Path
) -> None:
    deployed(host, tmp_path)
    make_venv(host, f"{ENGINES}/vllm-live")
    name_engine(host, f"{SERVICE}/service.env", f"{ENGINES}/vllm-live")
    (engine,) = [v for v in venvs_on_disk(host, SETTINGS) if v.kind == "engine"]
    assert engine.live and not engine.prunable


def test_an_unreadable_release_env_keeps_every_engine(host: FakeHost, tmp_path: Path) -> None:
    """Which engine a release needs is only in its env file: when that cannot be read, no
    engine venv is deleted (a rollback might need any of them)."""
    release = deployed(host, tmp_path)
    make_venv(host, f"{ENGINES}/vllm-a")
    make_venv(host, f"{SERVICE}/venvs/old-code-id")
    host.path(release["env_file"]).unlink()
    gone = prune_venvs(host, SETTINGS)
    assert [v.path for v in gone] == [f"{SERVICE}/venvs/old-code-id"]
    assert host.path(f"{ENGINES}/vllm-a").is_dir()


def test_engine_venv_of_reads_the_env_file_as_systemd_does() -> None:
    assert engine_venv_of('ASOBA_VLLM_PYTHON="/opt/e/vllm-1/bin/python"\n') == "/opt/e/vllm-1"
    assert engine_venv_of("ASOBA_BACKEND=transformers\n") is None
    assert engine_venv_of("ASOBA_VLLM_PYTHON=/opt/e/python\n") is None  # not <venv>/bin/
    with pytest.raises(ValueError):
        engine_venv_of('ASOBA_VLLM_PYTHON="unterminated\n')


def test_cli_lists_and_prunes_with_consent(host: FakeHost, tmp_path: Path) -> None:
    deploy(host, tmp_path)[0].run()
    make_venv(host, f"{SERVICE}/venvs/old-code-id")
    listed = ops(host, "venvs")
    assert listed.exit_code == 0, listed.output
    assert "nothing (prunable)" in listed.stdout and "--prune would free" in listed.stdout

    refused = ops(host, "venvs", "--prune", env={"MODEL_DEPLOYER_YES": ""})
    assert refused.exit_code == 2
    assert f"deletes {SERVICE}/venvs/old-code-id" in refused.stderr
    assert host.path(f"{SERVICE}/venvs/old-code-id").is_dir()

    pruned = ops(host, "venvs", "--prune", "--yes", "--json")
    assert pruned.exit_code == 0, pruned.output
    removed = json.loads(pruned.stdout)["removed"]
    assert [v["path"] for v in removed] == [f"{SERVICE}/venvs/old-code-id"]
    assert removed[0]["prunable"] is True
    assert "prunable" not in ops(host, "venvs").stdout
