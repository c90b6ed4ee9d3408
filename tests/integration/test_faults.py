"""Faults during a deploy, injected into the real sandbox host; each must end in a known good
state (the previous service or Flux serving, no lock left, nothing partial under a final name,
a clear message, a non-zero exit) from which the next run converges.

The ``chaos`` marker holds the long matrix (``make chaos``); the rest runs in ``make test``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.deploy_support import (
    FLUX,
    LOCK,
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
from tests.integration.s3_proxy import StallingProxy
from tests.sandbox import SANDBOX_SCRIPTS, SandboxHost, wait_until

pytestmark = pytest.mark.sandbox

HARNESS = Path(__file__).with_name("fault_cli.py")
#: Kills every SSH session of the ssh user on the host (the deploy's, and this command's own).
KILL_SESSIONS = "sudo pkill -KILL -f 'sshd: ubuntu@notty'"


def deploy_with_fault(
    host: SandboxHost, at: str, command: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HARNESS), *args],
        env={
            **os.environ,
            **host.env,
            **(env or {}),
            "FAULT_AT": at,
            "FAULT_CMD": command,
            "PYTHONPATH": str(HARNESS.parents[2]),
        },
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def on_host(host: SandboxHost, command: str) -> str:
    """A shell command line that runs ``command`` on the host over the system ssh client."""
    return shlex.join(host.ssh_argv(command))


def final_dirs_are_complete(host: SandboxHost, model: str) -> None:
    """Every non-staging directory under the model's dir is a complete, verified pull."""
    listing = host.ssh(f"ls -A /opt/models/{model} 2>/dev/null; true").stdout.split()
    for name in listing:
        if name.startswith("."):
            continue
        manifest = host.ssh(f"cat /opt/models/{model}/{name}/manifest.json", check=False)
        assert manifest.returncode == 0, f"{model}/{name} is under a final name without manifest"


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr[-2000:]


# Points where the deploy's SSH connection is killed while idle: before a step's first remote
# command ("start:") or right after a step ("done:"). Replace mode, so Flux is stopped on the
# way. The connection is reopened (the host key verified again) and the deploy completes.
FAST_CUTS = ["start:pull-weights", "start:stop-flux"]
ALL_CUTS = [
    "start:lock",
    "start:re-inspect",
    "start:install-venv",
    "start:render-unit",
    "done:stop-flux",
    "start:start",
    "start:wait-healthy",
    "start:write-discovery-env",
]


@pytest.mark.parametrize(
    "at", [*FAST_CUTS, *(pytest.param(a, marks=pytest.mark.chaos) for a in ALL_CUTS)]
)
def test_ssh_connection_killed_between_steps_is_reopened(host: SandboxHost, at: str) -> None:
    host.set_flux_gpu_mib(22800)  # too little GPU left to share: the plan stops Flux
    known_hosts = host.known_hosts.read_text()
    # The sleep lets the client see the connection close before the next command.
    cut = deploy_with_fault(host, at, on_host(host, KILL_SESSIONS) + "; sleep 1", "demo-tiny")
    assert "[fault]" in cut.stdout + cut.stderr, "the fault point was never reached"
    assert cut.returncode == 0, cut.stdout[-3000:] + cut.stderr[-3000:]
    assert status(host, 8000)["model"] == "demo-tiny"
    assert host.unit_property(FLUX, "ActiveState") == "inactive"
    assert not lock_left(host)
    assert host.known_hosts.read_text() == known_hosts  # nothing trusted anew


def test_ssh_connection_killed_while_a_step_runs_rolls_back(host: SandboxHost) -> None:
    """The connection dies under the health wait (a remote command in flight): the deploy
    cannot know what that command did, so it fails, reconnects to roll back, and the next
    run converges."""
    host.set_flux_gpu_mib(22800)
    # The new process is frozen so the wait cannot end by itself; the kill comes in the
    # background, so the deploy goes on into the wait and the sessions die in the middle of it.
    freeze = on_host(host, f"sudo systemctl kill --signal=SIGSTOP {UNIT}")
    kill_soon = f"{freeze}; (sleep 1.5; {on_host(host, KILL_SESSIONS)}) >/dev/null 2>&1 &"
    cut = deploy_with_fault(host, "done:start", kill_soon, "demo-tiny")
    assert "[fault]" in cut.stdout + cut.stderr
    assert_clean_failure(cut)
    assert "connection to" in cut.stderr and "lost" in cut.stderr
    assert "rolled back" in cut.stderr
    # Known good: Flux serving, the new unit not running, no lock, nothing partial landed.
    assert host.unit_property(FLUX, "ActiveState") == "active"
    assert host.unit_property(UNIT, "ActiveState") in {"inactive", "failed", ""}
    assert not lock_left(host)
    final_dirs_are_complete(host, "demo-tiny")

    again = deploy(host, "demo-tiny", "--json")
    assert again.returncode == 0, again.stderr
    assert last_json(again.stdout)["apply"]["outcome"] == "deployed"
    assert status(host, 8000)["model"] == "demo-tiny"
    assert host.unit_property(FLUX, "ActiveState") == "inactive"
    assert host.unit_property(UNIT, "UnitFileState") == "enabled"


def test_a_killed_deploy_leaves_a_stale_lock_the_next_run_takes_over(host: SandboxHost) -> None:
    """The operator's deploy dies (SIGKILL) while it holds the lock: nothing releases it.
    The next run from this machine sees the holder's pid is gone and takes the lock over."""
    proc = subprocess.Popen(
        [sys.executable, str(HARNESS), "demo-tiny"],
        env={
            **os.environ,
            **host.env,
            "FAULT_AT": "done:lock",
            "FAULT_CMD": "kill -KILL $PPID",  # the harness's own process: SIGKILL, no cleanup
            "PYTHONPATH": str(HARNESS.parents[2]),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.wait(timeout=300) == -signal.SIGKILL
    holder = json.loads(host.ssh(f"cat {LOCK}/info.json").stdout)
    assert holder["pid"] == proc.pid

    again = deploy(host, "demo-tiny")
    assert again.returncode == 0, again.stderr
    assert "stale" in again.stdout + again.stderr
    assert status(host, 8001)["model"] == "demo-tiny"
    assert not lock_left(host)


def test_a_service_that_hangs_in_load_is_rolled_back_after_the_timeout(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    assert deploy(host, "demo-tiny").returncode == 0
    upload(host, demo_dir, "models/second-tiny/")
    catalog = extra_catalog(tmp_path, **{"second-tiny": {}})
    hung = deploy_with_fault(
        host,
        "done:start",  # the new process freezes as it starts loading
        on_host(host, f"sudo systemctl kill --signal=SIGSTOP {UNIT}"),
        "second-tiny",
        env={
            "MODEL_DEPLOYER_CATALOG": str(catalog),
            "MODEL_DEPLOYER_SERVICE__HEALTH_TIMEOUT_S": "20",
        },
    )
    assert_clean_failure(hung)
    assert "rolled back" in hung.stderr
    wait_until(
        lambda: status(host, 8001).get("model") == "demo-tiny",
        timeout=120,
        what="the previous model serving again",
    )
    assert host.unit_property(FLUX, "ActiveState") == "active"
    assert "demo-tiny" in host.sudo("cat /opt/asoba-inference/service.env").stdout
    assert not lock_left(host)


def test_a_service_that_dies_later_is_restarted_and_status_says_so(host: SandboxHost) -> None:
    assert deploy(host, "demo-tiny").returncode == 0
    before = json.loads(ops(host, "status", "--json").stdout)
    pid = host.unit_property(UNIT, "MainPID")
    host.sudo(f"systemctl kill --signal=SIGKILL {UNIT}")
    wait_until(
        lambda: host.unit_property(UNIT, "MainPID") not in {pid, "0"},
        timeout=60,
        what="systemd restarting the service",
    )
    wait_until(lambda: _healthy(host, 8001), timeout=180, what="the restarted service answering")
    after = ops(host, "status", "--json")
    assert after.returncode == 0, after.stderr
    report = json.loads(after.stdout)
    assert report["restarts"] == before["restarts"] + 1, report
    human = ops(host, "status")
    assert "restart" in human.stdout.lower(), human.stdout


def _healthy(host: SandboxHost, port: int) -> bool:
    try:
        return httpx.get(host.url(port, "/health"), timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_planted_secrets_never_leave_where_they_belong(host: SandboxHost) -> None:
    """A planted API key and AWS secret key: they must not show in any output, plan JSON,
    audit log, journal or host process arguments; the env file holding the key is 0600 and
    owned by the service user."""
    api_key = f"sk-planted-{uuid.uuid4().hex}"
    aws_secret = f"planted{uuid.uuid4().hex}"
    env = {
        "MODEL_DEPLOYER_API_KEY": api_key,
        "AWS_ACCESS_KEY_ID": "AKIAPLANTEDTEST00001",
        "AWS_SECRET_ACCESS_KEY": aws_secret,
    }
    seen: list[str] = []
    stop = threading.Event()

    def watch_processes() -> None:
        while not stop.is_set():
            seen.append(host.ssh("ps -eo args", check=False, timeout=30).stdout)
            stop.wait(0.5)

    watcher = threading.Thread(target=watch_processes)
    watcher.start()
    try:
        outputs = [
            deploy(host, "demo-tiny", "--dry-run", "--json", env=env),
            deploy(host, "demo-tiny", "--json", env=env),
            deploy(host, "demo-tiny", env=env),  # the no-op re-run, human output
            ops(host, "status", "--json", env=env),
            ops(host, "status", env=env),
            ops(host, "logs", "-n", "200", env=env),
        ]
    finally:
        stop.set()
        watcher.join()
    for result in outputs:
        assert result.returncode == 0, result.args
    headers = {"Authorization": f"Bearer {api_key}"}
    assert httpx.get(host.url(8001, "/v1/models"), headers=headers, timeout=10).status_code == 200
    assert httpx.get(host.url(8001, "/v1/models"), timeout=10).status_code == 401
    assert httpx.get(host.url(8001, "/status"), timeout=10).status_code == 200

    env_file = "/opt/asoba-inference/service.env"
    owner = "asoba-inference"  # remote.service_user's default, which the sandbox config keeps
    assert host.sudo(f"stat -c '%a %U' {env_file}").stdout.split() == ["600", owner]
    # Every file on the host that holds the key is an env file readable by its owner only.
    # (The secret goes to grep on stdin: in its argv, sudo would log it to the journal.)
    holders = host.sudo(
        "grep -rlF -f /dev/stdin /etc /opt /var/lib /var/log /home /tmp /root; true",
        input=api_key + "\n",
    ).stdout.split()
    assert env_file in holders
    for path in holders:
        mode = host.sudo(f"stat -c '%a' {shlex.quote(path)}").stdout.strip()
        assert path.endswith(".env") and mode == "600", (path, mode)
    host_logs = host.sudo(
        "journalctl --no-pager -o cat; cat /var/lib/model-deployer/audit.log"
    ).stdout
    texts = {
        **{f"output of {' '.join(r.args[-3:])}": r.stdout + r.stderr for r in outputs},
        "host journal and audit log": host_logs,
        "host process arguments": "\n".join(seen),
    }
    assert len(seen) > 3
    for where, text in texts.items():
        assert api_key not in text, where
        assert aws_secret not in text, where
    leaked = host.sudo(
        "grep -rlF -f /dev/stdin /etc /opt /var /home /tmp /root; true", input=aws_secret + "\n"
    )
    assert leaked.stdout == ""


def test_truncated_weights_in_s3_are_refused_before_anything_switches(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    """S3 holds a shard cut short (its ETag matches the short object, so transfer checks
    pass): the pull's safetensors check refuses it; the previous service keeps serving."""
    assert deploy(host, "demo-tiny").returncode == 0
    bad = tmp_path / "truncated"
    bad.mkdir()
    last_shard = sorted(p.name for p in demo_dir.iterdir() if p.suffix == ".safetensors")[-1]
    for path in demo_dir.iterdir():
        data = path.read_bytes()
        (bad / path.name).write_bytes(data[:-4096] if path.name == last_shard else data)
    upload(host, bad, "models/truncated-tiny/")
    catalog = extra_catalog(tmp_path, **{"truncated-tiny": {}})

    failed = deploy(host, "truncated-tiny", env={"MODEL_DEPLOYER_CATALOG": str(catalog)})
    assert_clean_failure(failed)
    assert last_shard in failed.stderr and "truncated" in failed.stderr
    assert status(host, 8001)["model"] == "demo-tiny"
    assert host.unit_property(FLUX, "ActiveState") == "active"
    assert not lock_left(host)
    listing = host.ssh("ls -A /opt/models/truncated-tiny").stdout.split()
    assert listing and all(name.startswith(".") for name in listing), listing


def test_a_stalled_s3_endpoint_fails_the_pull_and_the_next_run_resumes(
    host: SandboxHost, demo_dir: Path, tmp_path: Path
) -> None:
    catalog = upload_padded(host, demo_dir, tmp_path, 24)
    env = {
        "MODEL_DEPLOYER_CATALOG": str(catalog),
        "MODEL_DEPLOYER_S3__PULL_CONCURRENCY": "2",
        "MODEL_DEPLOYER_S3__PULL_PART_MB": "5",
    }
    endpoint_host = host.s3_endpoint.split("//")[1].split(":")[0]
    proxy = StallingProxy(host.s3_endpoint, endpoint_host, budget=12 << 20, rate=2e6)
    with proxy:
        stalled = deploy(
            host,
            "padded-tiny",
            env={
                **env,
                "MODEL_DEPLOYER_S3__ENDPOINT_URL": proxy.url,
                "MODEL_DEPLOYER_S3__PULL_READ_TIMEOUT_S": "2",
            },
            timeout=600,
        )
        assert proxy.forwarded >= proxy.budget  # it did go silent
    assert_clean_failure(stalled)
    assert "timed out" in stalled.stderr.lower() or "timeout" in stalled.stderr.lower()
    assert host.unit_property(FLUX, "ActiveState") == "active"
    assert host.unit_property(UNIT, "LoadState") == "not-found"
    assert not lock_left(host)
    listing = host.ssh("ls -A /opt/models/padded-tiny").stdout.split()
    assert any(n.startswith(".staging-") for n in listing)
    assert all(n.startswith(".") for n in listing), listing

    again = deploy(host, "padded-tiny", "--json", env=env)
    assert again.returncode == 0, again.stderr
    result = last_json(again.stdout)["apply"]
    assert 0 < result["fetched_bytes"] < 24 * 1024 * 1024  # resumed, not started over
    assert status(host, 8001)["model"] == "padded-tiny"


REBOOT = (
    f"{SANDBOX_SCRIPTS}/down --keep-state --quiet && {SANDBOX_SCRIPTS}/up --keep-state >/dev/null"
)


@pytest.mark.chaos
def test_the_host_reboots_in_the_middle_of_a_deploy(host: SandboxHost, demo_dir: Path) -> None:
    """The host shuts down and boots again (same disk, same host key) right after the new unit
    was enabled and started. The deploy reconnects, finds the unit started by the boot, and
    completes; status is true; a second reboot brings the unit and Flux back by themselves
    and a re-run is a no-op."""
    rebooted = deploy_with_fault(host, "done:start", REBOOT, "demo-tiny")
    assert "[fault]" in rebooted.stdout + rebooted.stderr
    assert rebooted.returncode == 0, rebooted.stdout[-3000:] + rebooted.stderr[-3000:]
    assert not lock_left(host)
    report = json.loads(ops(host, "status", "--json").stdout)
    assert report["model"] == "demo-tiny" and report["health"] == "ok", report

    subprocess.run(REBOOT, shell=True, check=True, timeout=300)
    upload(host, demo_dir, "models/demo-tiny/")  # the S3 double restarted empty
    wait_until(lambda: _healthy(host, 8001), timeout=180, what="the service back after boot")
    for unit in (UNIT, FLUX):
        assert host.unit_property(unit, "UnitFileState") == "enabled"
        assert host.unit_property(unit, "ActiveState") == "active"
    after = json.loads(ops(host, "status", "--json").stdout)
    assert after["model"] == "demo-tiny" and after["health"] == "ok", after
    again = deploy(host, "demo-tiny", "--json")
    assert again.returncode == 0, again.stderr
    assert last_json(again.stdout)["apply"]["outcome"] == "unchanged"


@pytest.mark.chaos
def test_after_a_reboot_only_our_service_runs_in_place_of_flux(
    host: SandboxHost, demo_dir: Path
) -> None:
    """A replace deploy parks Flux (stopped and disabled): the host reboots and only our
    service comes back; undeploy puts Flux back as it was, enabled and running."""
    host.set_flux_gpu_mib(22800)
    done = deploy(host, "demo-tiny", "--json")
    assert done.returncode == 0, done.stderr
    assert last_json(done.stdout)["stop_flux"]
    subprocess.run(REBOOT, shell=True, check=True, timeout=300)
    upload(host, demo_dir, "models/demo-tiny/")  # the S3 double restarted empty
    wait_until(lambda: _healthy(host, 8000), timeout=180, what="the service back after boot")
    assert host.unit_property(UNIT, "ActiveState") == "active"
    assert host.unit_property(FLUX, "ActiveState") == "inactive"
    assert host.unit_property(FLUX, "UnitFileState") == "disabled"
    gone = ops(host, "undeploy")
    assert gone.returncode == 0, gone.stderr
    assert host.unit_property(FLUX, "UnitFileState") == "enabled"
    assert host.unit_property(FLUX, "ActiveState") == "active"


def test_the_disk_fills_before_the_pull_and_the_next_run_converges(host: SandboxHost) -> None:
    """The plan saw room; by the time the pull starts another process has filled the disk.
    The pull refuses (it checks and preallocates every file before fetching, so a disk that
    fills later cannot cut a file short) and the host is left as it was."""
    host.sudo("install -d /opt/models && mount -t tmpfs -o size=48m,mode=0755 tmpfs /opt/models")
    try:
        env = {"MODEL_DEPLOYER_POLICY__DISK_MARGIN_GB": "0.004"}
        fill = on_host(host, "sudo dd if=/dev/zero of=/opt/models/.filler bs=1M 2>/dev/null; true")
        full = deploy_with_fault(host, "start:pull-weights", fill, "demo-tiny", env=env)
        assert "[fault]" in full.stdout + full.stderr
        assert_clean_failure(full)
        assert "disk" in full.stderr.lower()
        assert host.unit_property(FLUX, "ActiveState") == "active"
        assert host.unit_property(UNIT, "LoadState") == "not-found"
        assert not lock_left(host)
        final_dirs_are_complete(host, "demo-tiny")

        host.sudo("rm -f /opt/models/.filler")
        again = deploy(host, "demo-tiny", env=env)
        assert again.returncode == 0, again.stderr
        assert status(host, 8001)["model"] == "demo-tiny"
    finally:
        host.sudo("systemctl stop asoba-inference.service; umount -l /opt/models", check=False)


def test_the_installed_unit_is_hardened(host: SandboxHost) -> None:
    """``systemd-analyze security`` of the unit as installed and running on the host."""
    assert deploy(host, "demo-tiny").returncode == 0
    report = host.ssh(f"systemd-analyze security --no-pager {UNIT}", check=False).stdout
    score = float(report.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
    assert score <= 2.0, report
    assert host.unit_property(UNIT, "User") == "asoba-inference"  # not the SSH login user
    assert host.unit_property(UNIT, "NoNewPrivileges") == "yes"
    assert host.unit_property(UNIT, "LimitCORE") == "0"
    assert host.unit_property(UNIT, "MemoryMax") not in {"", "infinity"}
