"""Apply, against the sandbox host: deploy, no-op re-run, replace Flux, undeploy, rollback on
a service that cannot become healthy, an SSH cut in the middle of the pull, and the lock."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name

from deployer.service_code import SERVER_LOCK, code_id, lock_hash
from tests.integration.deploy_support import (
    BIN,
    FLUX,
    UNIT,
    deploy,
    extra_catalog,
    last_json,
    lock_left,
    ops,
    status,
    upload,
    upload_padded,
)
from tests.sandbox import SandboxHost, wait_until

pytestmark = pytest.mark.sandbox
SERVICE_USER = "asoba-inference"  # remote.service_user's default: the service's own account


def test_deploy_beside_flux_then_rerun_is_a_noop(host: SandboxHost) -> None:
    first = deploy(host, "demo-tiny", "--json")
    assert first.returncode == 0, first.stderr
    out = last_json(first.stdout)
    assert out["action"] == "coexist" and out["port"] == 8001
    assert out["apply"]["outcome"] == "deployed"

    assert host.unit_property(FLUX, "ActiveState") == "active"
    assert host.unit_property(UNIT, "ActiveState") == "active"
    # Its own system account, made by the deploy: not the SSH user that runs Flux.
    assert host.unit_property(UNIT, "User") == SERVICE_USER
    pid = host.unit_property(UNIT, "MainPID")
    assert host.ssh(f"ps -o user:32= -p {pid}").stdout.strip() == SERVICE_USER
    assert host.ssh(f"getent passwd {SERVICE_USER}").stdout.split(":")[6].strip() == (
        "/usr/sbin/nologin"
    )
    assert host.unit_property(UNIT, "MemoryMax") == str(32 * 1024**3)
    assert host.unit_property(UNIT, "CPUQuotaPerSecUSec") == "8s"
    assert host.unit_property(UNIT, "Restart") == "always"
    assert host.ssh("stat -c '%a %U' /opt/asoba-inference/service.env").stdout.split() == [
        "600",
        SERVICE_USER,
    ]

    body = status(host, 8001)
    assert body["status"] == "healthy" and body["model"] == "demo-tiny" and body["port"] == 8001
    chat = httpx.post(
        host.url(8001, "/v1/chat/completions"),
        json={
            "model": "demo-tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
        timeout=60,
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"

    env = host.ssh("bash -lc 'echo $ASOBA_INFERENCE_PORT $MISTRAL_STATUS_URL'").stdout.split()
    assert env == ["8001", "http://localhost:8001/status"]

    entries = [json.loads(line) for line in ops(host, "audit", "--json").stdout.splitlines()]
    assert entries[-1]["model"] == "demo-tiny" and entries[-1]["outcome"] == "deployed"
    assert entries[-1]["key"].startswith("SHA256:")  # the SSH key the deploy logged in with
    chain = ops(host, "audit", "--verify")
    assert chain.returncode == 0 and chain.stdout.startswith("audit chain holds:"), chain.stdout

    pid_before = host.unit_property(UNIT, "MainPID")
    again = deploy(host, "demo-tiny", "--json")
    assert again.returncode == 0, again.stderr
    result = last_json(again.stdout)["apply"]
    assert result["outcome"] == "unchanged"
    assert result["fetched_bytes"] == 0
    assert host.unit_property(UNIT, "MainPID") == pid_before  # not restarted

    shown = ops(host, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    facts = json.loads(shown.stdout)
    assert (facts["model"], facts["port"], facts["health"]) == ("demo-tiny", 8001, "ok")
    assert facts["flux"].startswith("active")
    assert facts["lock_hash"] == lock_hash() and facts["code_id"] == code_id()


def _pins(text: str) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, re.MULTILINE)
    return {canonicalize_name(name): version for name, version in found}


def test_service_venv_holds_exactly_the_lock(host: SandboxHost) -> None:
    done = deploy(host, "demo-tiny", "--json")
    assert done.returncode == 0, done.stderr
    venv = "/opt/asoba-inference/venv"
    freeze = host.ssh(f"{venv}/bin/python -m pip freeze --local --exclude-editable").stdout
    installed = _pins(freeze)
    locked = _pins(SERVER_LOCK.read_text())
    assert len(locked) > 40
    # Every locked package at its locked version, and nothing unlocked but the service itself
    # (frozen as `model-deployer @ file://...`, the wheel it was installed from).
    assert {name: installed.get(name) for name in locked} == locked
    assert set(installed) - set(locked) == set()
    assert any(ln.startswith("model-deployer @ file://") for ln in freeze.splitlines())
    assert [ln for ln in freeze.splitlines() if "==" not in ln] == [
        ln for ln in freeze.splitlines() if ln.startswith("model-deployer @ file://")
    ]
    # What the host provides stays the host's: torch from the system site-packages.
    where = host.ssh(f"{venv}/bin/python -c 'import torch; print(torch.__file__)'").stdout
    assert where.startswith("/usr/local/lib/python3.11/dist-packages/torch/")
    assert host.ssh(f"cat {venv}/lock.txt").stdout == SERVER_LOCK.read_text()


def test_replace_stops_flux_and_undeploy_restores_it(host: SandboxHost) -> None:
    host.set_flux_gpu_mib(22800)  # Flux leaves too little GPU memory to share
    no_consent = {"MODEL_DEPLOYER_YES": ""}
    refused = deploy(host, "demo-tiny", env=no_consent)  # no terminal, no --yes
    assert refused.returncode == 2, refused.stderr
    assert "stops flux-api.service: not confirmed" in refused.stderr
    assert host.unit_property(FLUX, "ActiveState") == "active"
    assert host.unit_property(UNIT, "LoadState") == "not-found"

    done = deploy(host, "demo-tiny", "--json")  # MODEL_DEPLOYER_YES=1 in the tests' env
    assert done.returncode == 0, done.stderr
    plan = last_json(done.stdout)
    assert plan["action"] == "replace" and plan["stop_flux"] and plan["port"] == 8000
    assert host.unit_property(FLUX, "ActiveState") == "inactive"
    # Parked for the life of the deploy: a reboot must not start it beside our model.
    assert host.unit_property(FLUX, "UnitFileState") == "disabled"
    assert status(host, 8000)["model"] == "demo-tiny"

    kept = ops(host, "undeploy", env=no_consent)
    assert kept.returncode == 2 and "stops and removes asoba-inference.service" in kept.stderr
    assert host.unit_property(UNIT, "ActiveState") == "active"

    # A model this tool never deployed, beside ours: purging leaves it alone.
    host.sudo("install -d /opt/models/someone-else/v1 && touch /opt/models/someone-else/v1/w")
    ours = host.ssh("ls -d /opt/models/demo-tiny/*").stdout.split()
    gone = ops(host, "undeploy", "--purge-models", "--yes", env=no_consent)
    assert gone.returncode == 0, gone.stderr
    assert ours and all(f"removed {path}" in gone.stdout for path in ours)
    assert host.ssh("ls /opt/models").stdout.split() == ["someone-else"]
    assert host.unit_property(FLUX, "ActiveState") == "active"
    assert host.unit_property(FLUX, "UnitFileState") == "enabled"  # as it was before
    leftovers = host.ssh(
        "ls -d /etc/systemd/system/asoba-inference.service /opt/asoba-inference "
        "/var/lib/model-deployer/lock /etc/profile.d/asoba-inference.sh 2>/dev/null; true"
    ).stdout.split()
    assert leftovers == []
    assert host.unit_property(UNIT, "LoadState") == "not-found"


def test_unhealthy_service_rolls_back_to_the_previous_one(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    assert deploy(host, "demo-tiny").returncode == 0
    pid_before = host.unit_property(UNIT, "MainPID")
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in demo_dir.iterdir():
        data = path.read_bytes()
        if path.name == "config.json":  # whole, verified files that no loader accepts
            config = {**json.loads(data), "model_type": "no-such-architecture"}
            data = json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}).encode()
        (broken / path.name).write_bytes(data)
    upload(host, broken, "models/broken-tiny/")
    catalog = extra_catalog(tmp_path, **{"broken-tiny": {}})

    failed = deploy(
        host,
        "broken-tiny",
        env={
            "MODEL_DEPLOYER_CATALOG": str(catalog),
            "MODEL_DEPLOYER_SERVICE__HEALTH_TIMEOUT_S": "120",
        },
    )
    assert failed.returncode != 0
    assert "rolled back" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert host.unit_property(FLUX, "ActiveState") == "active"
    wait_until(
        lambda: status(host, 8001).get("model") == "demo-tiny",
        timeout=120,
        what="the previous model serving again",
    )
    assert host.unit_property(UNIT, "MainPID") != pid_before  # restarted with its old files
    assert "demo-tiny" in host.sudo("cat /opt/asoba-inference/service.env").stdout
    assert not lock_left(host)


def test_ssh_cut_during_the_pull_resumes_on_the_next_run(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    catalog = upload_padded(host, demo_dir, tmp_path, 48)
    env = {
        "MODEL_DEPLOYER_CATALOG": str(catalog),
        # 5 MB/s in 8 MiB ranges: about 10 s for the padding, a finished range every ~3 s.
        "MODEL_DEPLOYER_S3__PULL_MAX_RATE_MBPS": "40",
        "MODEL_DEPLOYER_S3__PULL_CONCURRENCY": "2",
        "MODEL_DEPLOYER_S3__PULL_PART_MB": "8",
    }
    proc = subprocess.Popen(
        [str(BIN / "deploy-model"), "padded-tiny"],
        env={**os.environ, **host.env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    progress = re.compile(r"^\s+([\d.]+) MB / [\d.]+ MB at")

    def pulled_mb() -> float:
        found = [float(m.group(1)) for line in list(lines) if (m := progress.match(line))]
        return max(found, default=0.0)

    try:
        wait_until(lambda: pulled_mb() >= 30, timeout=300, what="the pull under way")
        # Drop every SSH session of the deploy (the test's own command goes with it).
        host.ssh("sudo pkill -KILL -f 'sshd: ubuntu@notty'", check=False)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    output = "".join(lines)
    assert proc.returncode != 0, output
    assert "Traceback" not in output
    listing = host.ssh("ls -a /opt/models/padded-tiny").stdout.split()
    assert any(name.startswith(".staging-") for name in listing)
    assert [n for n in listing if not n.startswith(".")] == []  # nothing under a final name

    again = deploy(host, "padded-tiny", "--json", env=env)
    assert again.returncode == 0, again.stderr
    result = last_json(again.stdout)["apply"]
    assert result["outcome"] == "deployed"
    assert 0 < result["fetched_bytes"] < 48 * 1024 * 1024
    assert status(host, 8001)["model"] == "padded-tiny"


def test_a_held_lock_is_reported_and_two_deploys_race_for_it(host: SandboxHost) -> None:
    holder = {
        "user": "alice",
        "machine": "ops-laptop",
        "pid": 4242,
        "since": "2026-11-23T10:00:00+00:00",
        "command": "deploy-model qwen3-14b",
        "token": "t0",
    }
    host.sudo(
        "install -d -m 0755 /var/lib/model-deployer && "
        "install -d -m 0700 /var/lib/model-deployer/lock && "
        f"echo '{json.dumps(holder)}' > /tmp/info.json && "
        "install -m 0644 /tmp/info.json /var/lib/model-deployer/lock/info.json"
    )
    held = deploy(host, "demo-tiny")
    assert held.returncode == 5
    assert "alice@ops-laptop" in held.stderr and "Traceback" not in held.stderr
    assert host.unit_property(UNIT, "LoadState") == "not-found"
    assert ops(host, "unlock").returncode == 0

    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(deploy(host, "demo-tiny"))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=900)
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 5], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 5)
    assert "holds the host lock" in loser.stderr


def test_missing_s3_source_fails_before_the_host_changes(host: SandboxHost, tmp_path: Path) -> None:
    before = host.sudo(
        "ls -la /etc/systemd/system /opt /var/lib 2>&1; systemctl is-active flux-api.service"
    ).stdout
    catalog = extra_catalog(tmp_path, **{"ghost-tiny": {}})
    failed = deploy(host, "ghost-tiny", env={"MODEL_DEPLOYER_CATALOG": str(catalog)})
    assert failed.returncode != 0
    assert "s3://asoba-llm-cache/models/ghost-tiny/" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    after = host.sudo(
        "ls -la /etc/systemd/system /opt /var/lib 2>&1; systemctl is-active flux-api.service"
    ).stdout
    assert after == before


def test_bootstrap_hook_output_is_shown_and_its_failure_rolls_back(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "ok.sh").write_text('echo "hook saw $MODEL_NAME in $MODEL_DIR"\n')
    (hooks / "bad.sh").write_text('echo "checking $MODEL_NAME"; echo "no GPU driver" >&2; exit 3\n')
    upload(host, demo_dir, "models/hooked-ok/")
    upload(host, demo_dir, "models/hooked-bad/")
    catalog = extra_catalog(
        tmp_path,
        **{
            "hooked-ok": {"bootstrap": {"script": "hooks/ok.sh", "step": "before-start"}},
            "hooked-bad": {"bootstrap": {"script": "hooks/bad.sh", "step": "before-start"}},
        },
    )
    env = {"MODEL_DEPLOYER_CATALOG": str(catalog)}
    good = deploy(host, "hooked-ok", env=env)
    assert good.returncode == 0, good.stderr
    assert "hook saw hooked-ok in /opt/models/hooked-ok/" in good.stdout

    bad = deploy(host, "hooked-bad", env=env)
    assert bad.returncode != 0
    assert "failed at bootstrap" in bad.stderr and "no GPU driver" in bad.stderr
    assert status(host, 8001)["model"] == "hooked-ok"
    assert host.unit_property(FLUX, "ActiveState") == "active"


def test_rollback_puts_the_previous_release_back(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    upload(host, demo_dir, "models/demo-tiny-b/")
    env = {"MODEL_DEPLOYER_CATALOG": str(extra_catalog(tmp_path, **{"demo-tiny-b": {}}))}
    assert deploy(host, "demo-tiny", env=env).returncode == 0
    assert deploy(host, "demo-tiny-b", env=env).returncode == 0
    assert status(host, 8001)["model"] == "demo-tiny-b"

    back = ops(host, "rollback", env=env)
    assert back.returncode == 0, back.stderr
    assert "demo-tiny" in back.stdout
    assert status(host, 8001)["model"] == "demo-tiny"
    shown = json.loads(ops(host, "status", "--json", env=env).stdout)
    assert shown["model"] == "demo-tiny" and shown["health"] == "ok"
    outcomes = [
        json.loads(line)["command"] for line in ops(host, "audit", "--json").stdout.splitlines()
    ]
    assert outcomes[-1] == "rollback"


def test_a_unit_this_tool_did_not_make_is_never_touched(host: SandboxHost) -> None:
    """`service_name = ssh.service` in the config: deploy, undeploy and rollback refuse before
    changing anything, and sshd keeps running (this test talks to the host over it)."""
    env = {"MODEL_DEPLOYER_REMOTE__SERVICE_NAME": "ssh.service"}
    before = host.unit_property("ssh.service", "MainPID")
    for result in (
        deploy(host, "demo-tiny", env=env),
        ops(host, "undeploy", env=env),
        ops(host, "rollback", env=env),
    ):
        assert result.returncode == 2, result.stderr
        assert "refusing to touch ssh.service" in result.stderr
        assert "defined by /lib/systemd/system/ssh.service" in result.stderr
    assert host.unit_property("ssh.service", "ActiveState") == "active"
    assert host.unit_property("ssh.service", "MainPID") == before
    assert host.ssh("test -e /etc/systemd/system/ssh.service", check=False).returncode == 1
    assert not lock_left(host)


def test_a_redeploy_without_the_key_keeps_the_hosts_key(host: SandboxHost) -> None:
    """An operator without MODEL_DEPLOYER_API_KEY does not open generation to the network:
    the host's key is kept (a no-op), and only --no-auth --yes removes it."""
    key = "sandbox-key-" + os.urandom(6).hex()
    first = deploy(host, "demo-tiny", "--json", env={"MODEL_DEPLOYER_API_KEY": key})
    assert first.returncode == 0, first.stderr
    assert last_json(first.stdout)["auth"] == "on"
    url = host.url(8001, "/v1/models")
    assert httpx.get(url, timeout=30).status_code == 401

    again = deploy(host, "demo-tiny", "--json", env={"MODEL_DEPLOYER_API_KEY": ""})
    assert again.returncode == 0, again.stderr
    out = last_json(again.stdout)
    assert (out["auth"], out["auth_source"]) == ("on", "host")
    assert out["apply"]["outcome"] == "unchanged"
    assert key not in again.stdout + again.stderr
    assert httpx.get(url, timeout=30).status_code == 401
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(url, headers=headers, timeout=30).status_code == 200

    no_key_no_consent = {"MODEL_DEPLOYER_API_KEY": "", "MODEL_DEPLOYER_YES": ""}
    refused = deploy(host, "demo-tiny", "--no-auth", env=no_key_no_consent)
    assert refused.returncode == 2 and "removes the host's API key" in refused.stderr
    assert httpx.get(url, timeout=30).status_code == 401

    off = deploy(host, "demo-tiny", "--no-auth", "--yes", env=no_key_no_consent)
    assert off.returncode == 0, off.stderr
    assert httpx.get(url, timeout=30).status_code == 200  # the deploy waited for health
