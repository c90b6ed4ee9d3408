"""What an operator expects around a deploy, on the sandbox host: the model revisions and the
venvs on disk (``models``, ``venvs``, ``--prune``), ``--json`` and the group's options after the
subcommand, existing directories left as the operator made them, and the unit's own account
and port."""

from __future__ import annotations

import json

import pytest

from tests.integration.deploy_support import FLUX, UNIT, deploy, last_json, ops
from tests.sandbox import SandboxHost

pytestmark = pytest.mark.sandbox


def test_models_prune_json_and_what_the_deploy_leaves_alone(host: SandboxHost) -> None:
    # The operator's own models directory, root's: the deploy must not re-own it.
    host.sudo("install -d -m 0755 -o root -g root /opt/models")
    first = deploy(host, "demo-tiny", "--json")
    assert first.returncode == 0, first.stderr
    assert last_json(first.stdout)["apply"]["outcome"] == "deployed"
    assert host.sudo("stat -c '%a %U' /opt/models").stdout.split() == ["755", "root"]
    assert host.sudo("stat -c '%U' /opt/models/demo-tiny").stdout.strip() == host.user
    # The service's own account and port.
    assert host.unit_property(UNIT, "User") == "asoba-inference"
    assert host.unit_property(UNIT, "SocketBindDeny") == "any"
    assert "8001" in host.unit_property(UNIT, "SocketBindAllow")

    # A revision no release needs, next to the live one.
    stale = "/opt/models/demo-tiny/stale"
    host.ssh(f"mkdir -p {stale} && head -c 4096 /dev/zero > {stale}/w")
    config = host.env["MODEL_DEPLOYER_CONFIG"]
    listed = ops(host, "models", "--config", config, "--json")  # group options after it
    assert listed.returncode == 0, listed.stderr
    found = {m["revision"]: m for m in json.loads(listed.stdout)}
    assert found["stale"]["size_bytes"] >= 4096
    assert not (found["stale"]["live"] or found["stale"]["kept"])
    (live,) = [m for m in found.values() if m["live"]]
    assert live["kept"] and live["name"] == "demo-tiny"

    pruned = ops(host, "models", "--prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert [m["path"] for m in json.loads(pruned.stdout)["removed"]] == [stale]
    assert host.ssh(f"test -e {stale}", check=False).returncode != 0
    assert host.ssh(f"test -d {live['path']}", check=False).returncode == 0

    # A venv of an older service build (and one an interrupted install left half-made): no
    # release needs them, so `venvs --prune` deletes them, and only them.
    venvs = "/opt/asoba-inference/venvs"
    host.sudo(
        f"mkdir -p {venvs}/0ld-build/bin {venvs}/half-made && touch {venvs}/0ld-build/.complete"
    )
    listed = {v["name"]: v for v in json.loads(ops(host, "venvs", "--json").stdout)}
    assert listed["0ld-build"]["prunable"] and not listed["half-made"]["complete"]
    (live_venv,) = [v for v in listed.values() if v["live"]]
    venv_pruned = ops(host, "venvs", "--prune", "--yes", "--json")
    assert venv_pruned.returncode == 0, venv_pruned.stderr
    removed = {v["name"] for v in json.loads(venv_pruned.stdout)["removed"]}
    # Exactly what the listing called prunable (earlier tests' builds of other code too).
    assert removed == {name for name, v in listed.items() if v["prunable"]}
    assert {"0ld-build", "half-made"} <= removed and live_venv["name"] not in removed
    assert host.ssh(f"test -x {live_venv['path']}/bin/python", check=False).returncode == 0
    assert host.unit_property(UNIT, "ActiveState") == "active"

    gone = ops(host, "undeploy", "--json")
    assert gone.returncode == 0, gone.stderr
    out = json.loads(gone.stdout)
    assert f"/etc/systemd/system/{UNIT}" in out["removed"] and out["flux"] == "active"
    assert host.unit_property(FLUX, "ActiveState") == "active"
