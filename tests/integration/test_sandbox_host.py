"""The sandbox host behaves like the GPU hosts we deploy to, where the deployer can tell.

Each test states one property the deployer's integration tests rely on: key-only ssh with
verified host keys, passwordless sudo, systemd that restarts units and enforces limits, the
resident Flux service, the nvidia-smi boundary, and S3 reachable from both sides.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import paramiko
import pytest

from tests.sandbox import S3Endpoint, SandboxHost, wait_until

pytestmark = pytest.mark.sandbox

GPU_QUERY = "index,name,uuid,memory.total,memory.used,memory.free,utilization.gpu,driver_version"
APPS_QUERY = "pid,process_name,used_memory,gpu_uuid"


def _smi(host: SandboxHost, args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return host.ssh(f"nvidia-smi {args}", check=check)


def _gpu_row(host: SandboxHost) -> dict[str, str]:
    out = _smi(host, f"--query-gpu={GPU_QUERY} --format=csv,noheader,nounits").stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return dict(zip(GPU_QUERY.split(","), (v.strip() for v in lines[0].split(",")), strict=True))


def _apps(host: SandboxHost) -> list[list[str]]:
    out = _smi(host, f"--query-compute-apps={APPS_QUERY} --format=csv,noheader,nounits").stdout
    return [[v.strip() for v in line.split(",")] for line in out.strip().splitlines()]


def _flux_health(host: SandboxHost) -> dict[str, object]:
    response = httpx.get(host.url(8000, "/health"), timeout=2)
    response.raise_for_status()
    return dict(response.json())


# -- ssh and sudo -------------------------------------------------------------------------------


def test_key_login_as_ubuntu(sandbox: SandboxHost) -> None:
    out = sandbox.ssh("id -un; id -Gn; hostname").stdout.split("\n")
    assert out[0] == sandbox.user == "ubuntu"
    assert {"sudo", "adm", "systemd-journal"} <= set(out[1].split())


def test_password_login_is_refused(sandbox: SandboxHost) -> None:
    # What the server offers, asked by paramiko after checking the host key ourselves.
    known = paramiko.HostKeys(str(sandbox.known_hosts))
    with socket.create_connection((sandbox.address, sandbox.ssh_port), timeout=5) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            key = transport.get_remote_server_key()
            assert known.check(sandbox.address, key), "server key differs from known_hosts"
            with pytest.raises(paramiko.BadAuthenticationType) as refused:
                transport.auth_none(sandbox.user)
            assert refused.value.allowed_types == ["publickey"]
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password(sandbox.user, "ubuntu")
        finally:
            transport.close()
    # And the ssh client, told to use a password only, gets nowhere.
    argv = sandbox.ssh_argv("true")
    argv[1:1] = ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_unknown_host_key_is_refused(sandbox: SandboxHost, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    result = subprocess.run(
        sandbox.ssh_argv("true", known_hosts=empty),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr
    assert empty.read_text() == "", "the client must not add the key"

    # A different key on record for the address: refused as a changed host key.
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts_wrong"
    key_type, key_b64 = (other.with_suffix(".pub")).read_text().split()[:2]
    wrong.write_text(f"{sandbox.address} {key_type} {key_b64}\n")
    result = subprocess.run(
        sandbox.ssh_argv("true", known_hosts=wrong),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr


def test_passwordless_sudo(sandbox: SandboxHost) -> None:
    assert sandbox.ssh("sudo -n true", check=False).returncode == 0
    assert sandbox.sudo("id -u").stdout.strip() == "0"


# -- systemd ------------------------------------------------------------------------------------


def test_restart_always_unit_is_restarted_after_kill_9(sandbox: SandboxHost) -> None:
    unit = f"mdtest-restart-{uuid.uuid4().hex[:8]}.service"
    sandbox.sudo(
        f"systemd-run --quiet --unit={unit} --property=Restart=always "
        f"--property=RestartSec=200ms /bin/sleep 3600"
    )
    try:
        first = wait_until(
            lambda: int(sandbox.unit_property(unit, "MainPID")) or None,
            timeout=15,
            what=f"{unit} to start",
        )
        sandbox.sudo(f"kill -9 {first}")

        def restarted() -> int | None:
            pid = int(sandbox.unit_property(unit, "MainPID"))
            return pid if pid not in (0, first) else None

        second = wait_until(restarted, timeout=15, what=f"{unit} to come back")
        assert second != first
        assert sandbox.unit_property(unit, "ActiveState") == "active"
        assert int(sandbox.unit_property(unit, "NRestarts")) >= 1
    finally:
        sandbox.sudo(f"systemctl stop {unit}; systemctl reset-failed {unit} 2>/dev/null || true")


def test_memory_max_is_enforced(sandbox: SandboxHost) -> None:
    # Touch every page, so the allocation is resident and counts against the limit.
    hog = "python3 -c " + shlex.quote(
        "b = bytearray(300 * 1024 * 1024)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "print('allocated')"
    )

    def run(limit: str) -> subprocess.CompletedProcess[str]:
        unit = f"mdtest-mem-{uuid.uuid4().hex[:8]}.service"
        return sandbox.sudo(
            f"systemd-run --wait --pipe --collect --unit={unit} --property=MemoryMax={limit} "
            f"--property=MemorySwapMax=0 {hog}",
            check=False,
            timeout=120,
        )

    limited = run("50M")
    assert limited.returncode != 0, limited.stdout + limited.stderr
    # systemd-run --wait reports how the unit ended; cgroup v1 shows the kill as a signal.
    assert "allocated" not in limited.stdout
    assert "Finished with result: signal" in limited.stderr or "oom" in limited.stderr.lower(), (
        limited.stderr
    )

    roomy = run("1G")
    assert roomy.returncode == 0, roomy.stderr
    assert "allocated" in roomy.stdout


def test_cpu_quota_is_enforced(sandbox: SandboxHost) -> None:
    spin = "python3 -c " + shlex.quote(
        "import time\n"
        "start = time.monotonic()\n"
        "while time.monotonic() - start < 2: pass\n"
        "print(time.process_time())"
    )
    unit = f"mdtest-cpu-{uuid.uuid4().hex[:8]}.service"
    result = sandbox.sudo(
        f"systemd-run --quiet --wait --pipe --collect --unit={unit} --property=CPUQuota=20% {spin}",
        timeout=60,
    )
    cpu_seconds = float(result.stdout.strip())
    assert cpu_seconds < 0.8, f"{cpu_seconds:.2f} s of CPU in 2 s under CPUQuota=20%"


# -- the resident Flux stand-in -------------------------------------------------------------------


def test_flux_is_active_at_boot_and_answers_from_this_machine(sandbox: SandboxHost) -> None:
    assert sandbox.ssh("systemctl is-active flux-api.service").stdout.strip() == "active"
    assert sandbox.ssh("systemctl is-enabled flux-api.service").stdout.strip() == "enabled"
    assert sandbox.unit_property("flux-api.service", "User") == "ubuntu"
    assert "STAND-IN" in sandbox.unit_property("flux-api.service", "Description")
    health = _flux_health(sandbox)
    assert health["status"] == "ok"
    assert health["standin"] is True
    assert health["pid"] == int(sandbox.unit_property("flux-api.service", "MainPID"))


def test_flux_can_be_stopped_and_started(fresh_sandbox: SandboxHost) -> None:
    host = fresh_sandbox
    try:
        host.sudo("systemctl stop flux-api.service")
        assert host.ssh("systemctl is-active flux-api.service", check=False).stdout.strip() in {
            "inactive",
            "failed",
        }
        with pytest.raises(httpx.TransportError):
            httpx.get(host.url(8000, "/health"), timeout=2)
        host.sudo("systemctl start flux-api.service")
        health = wait_until(lambda: _flux_health(host), timeout=20, what="flux-api health")
        assert health["status"] == "ok"
    finally:
        host.reset()


def test_flux_holds_its_configured_ram(fresh_sandbox: SandboxHost) -> None:
    host = fresh_sandbox
    pid = host.unit_property("flux-api.service", "MainPID")
    rss_kib = int(host.ssh(f"ps -o rss= -p {pid}").stdout)
    ram_mb = int(str(_flux_health(host)["ram_mb"]))
    assert ram_mb >= 64
    assert rss_kib >= ram_mb * 1024


# -- the nvidia-smi test double -------------------------------------------------------------------


def test_nvidia_smi_double_answers_like_an_a10g(fresh_sandbox: SandboxHost) -> None:
    host = fresh_sandbox
    assert "test double" in host.ssh("head -n 3 /usr/local/bin/nvidia-smi").stdout.lower()

    row = _gpu_row(host)
    assert row["index"] == "0"
    assert row["name"] == "NVIDIA A10G"
    assert row["uuid"].startswith("GPU-")
    assert row["memory.total"] == "23028"
    assert int(row["memory.used"]) == host.gpu_state()["flux_mib"] == 14000
    assert int(row["memory.free"]) == 23028 - 14000
    assert row["driver_version"] == "535.183.01"

    # Any subset and order, with headers and units, as the real tool prints them.
    out = _smi(host, "--query-gpu=memory.used,pci.bus_id,temperature.gpu,name --format=csv")
    header, values = out.stdout.strip().splitlines()
    assert header == "memory.used [MiB], pci.bus_id, temperature.gpu, name"
    used, bus_id, temperature, name = (v.strip() for v in values.split(","))
    assert used == "14000 MiB"
    assert bus_id == "00000000:00:1E.0"
    assert temperature.isdigit()
    assert name == "NVIDIA A10G"
    out = _smi(host, "--query-gpu=memory.total --format=csv,nounits").stdout.splitlines()
    assert out == ["memory.total [MiB]", "23028"]

    flux_pid = host.unit_property("flux-api.service", "MainPID")
    apps = _apps(host)
    assert len(apps) == 1
    pid, process_name, used_mib, gpu_uuid = apps[0]
    assert pid == flux_pid
    assert "python" in process_name
    assert used_mib == "14000"
    assert gpu_uuid == row["uuid"]

    assert "CUDA Version: 12.2" in _smi(host, "").stdout
    assert "23028MiB" in _smi(host, "").stdout
    assert _smi(host, "-L").stdout.startswith("GPU 0: NVIDIA A10G (UUID: GPU-")
    assert "535.183.01" in _smi(host, "--version").stdout


def test_nvidia_smi_double_rejects_unknown_fields(sandbox: SandboxHost) -> None:
    result = _smi(host=sandbox, args="--query-gpu=name,bogus.field --format=csv", check=False)
    assert result.returncode == 2
    assert result.stdout.strip() == 'Field "bogus.field" is not a valid field to query.'
    result = _smi(sandbox, "--query-compute-apps=pid,name.bogus --format=csv", check=False)
    assert result.returncode == 2


def test_nvidia_smi_double_follows_flux(fresh_sandbox: SandboxHost) -> None:
    host = fresh_sandbox
    try:
        host.set_flux_gpu_mib(9000)
        assert _gpu_row(host)["memory.used"] == "9000"
        assert [app[2] for app in _apps(host)] == ["9000"]

        host.sudo("systemctl stop flux-api.service")
        row = _gpu_row(host)
        assert row["memory.used"] == "0"
        assert row["memory.free"] == "23028"
        assert _apps(host) == []

        host.sudo("systemctl start flux-api.service")
        wait_until(
            lambda: _gpu_row(host)["memory.used"] == "9000",
            timeout=15,
            what="flux's share to return",
        )
        host.update_gpu_state(units={"asoba-inference.service": 5000})
        assert _gpu_row(host)["memory.used"] == "9000"  # that unit is not running
    finally:
        host.reset()
    assert _gpu_row(host)["memory.used"] == "14000"


# -- reset ----------------------------------------------------------------------------------------


def test_reset_returns_the_host_to_its_boot_state(sandbox: SandboxHost) -> None:
    unit = (
        "[Unit]\nDescription=left over by a test\n[Service]\nExecStart=/bin/sleep 3600\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    sandbox.sudo(
        "mkdir -p /opt/asoba-inference/venv && "
        f"printf %s {shlex.quote(unit)} > /etc/systemd/system/asoba-inference.service && "
        "systemctl daemon-reload && systemctl enable --now --quiet asoba-inference.service && "
        "systemctl stop flux-api.service && echo FLUX_RAM_MB=64 >> /etc/flux-api/flux.env"
    )
    sandbox.set_flux_gpu_mib(1)

    sandbox.reset()

    assert sandbox.ssh("test -e /opt/asoba-inference", check=False).returncode == 1
    state = sandbox.ssh(
        "systemctl show --property=LoadState --value asoba-inference.service"
    ).stdout.strip()
    assert state == "not-found"
    assert sandbox.ssh("systemctl is-active flux-api.service").stdout.strip() == "active"
    assert _flux_health(sandbox)["ram_mb"] == 256
    assert sandbox.gpu_state()["flux_mib"] == 14000


# -- network and S3 -------------------------------------------------------------------------------


def test_this_machine_reaches_the_guest_ports(sandbox: SandboxHost) -> None:
    for port in (sandbox.ssh_port, 8000):
        with socket.create_connection((sandbox.address, port), timeout=5):
            pass
    # ...and the guest reaches nothing but the sandbox network: no default route.
    routes = sandbox.ssh("ip route show default").stdout.strip()
    assert routes == ""


def test_guest_fetches_an_object_put_from_this_machine(sandbox: SandboxHost) -> None:
    s3 = sandbox.s3_client()
    assert s3.meta.endpoint_url == sandbox.s3_endpoint
    assert s3.meta.region_name == sandbox.region
    body = uuid.uuid4().bytes * 4096
    key = f"tests/{uuid.uuid4().hex}/blob.bin"
    s3.put_object(Bucket=sandbox.bucket, Key=key, Body=body)
    try:
        url = s3.generate_presigned_url(
            "get_object", Params={"Bucket": sandbox.bucket, "Key": key}, ExpiresIn=300
        )
        remote = sandbox.ssh(f"curl -fsS --max-time 30 {shlex.quote(url)} | sha256sum")
        assert remote.stdout.split()[0] == hashlib.sha256(body).hexdigest()
    finally:
        s3.delete_object(Bucket=sandbox.bucket, Key=key)


def test_guest_venv_from_wheelhouse_reuses_torch_and_reaches_s3(sandbox: SandboxHost) -> None:
    """What the deploy does: a venv over the system torch, packages from /opt/wheels, and boto3
    on the host finding the endpoint and keys in ~/.aws with no special code."""
    key = f"tests/{uuid.uuid4().hex}.txt"
    sandbox.s3_client().put_object(Bucket=sandbox.bucket, Key=key, Body=b"hello from s3")
    venv = f"/tmp/mdtest-venv-{uuid.uuid4().hex[:8]}"
    script = (
        "import json, boto3, torch; s3 = boto3.client('s3');"
        f" body = s3.get_object(Bucket={sandbox.bucket!r}, Key={key!r})['Body'].read();"
        " print(json.dumps({'body': body.decode(), 'torch': torch.__version__,"
        " 'torch_file': torch.__file__}))"
    )
    try:
        sandbox.ssh(
            f"python3 -m venv --system-site-packages {venv} && "
            f"{venv}/bin/pip install --quiet --no-index --find-links /opt/wheels boto3",
            timeout=300,
        )
        out = json.loads(sandbox.ssh(f"{venv}/bin/python -c {shlex.quote(script)}").stdout)
    finally:
        sandbox.ssh(f"rm -rf {venv}", check=False)
        sandbox.s3_client().delete_object(Bucket=sandbox.bucket, Key=key)
    assert out["body"] == "hello from s3"
    assert out["torch"].startswith("2.13.0")
    assert out["torch_file"].startswith("/usr/local/lib/python3.11/dist-packages/")


def test_sandbox_env_configures_boto3_for_subprocesses(sandbox: SandboxHost) -> None:
    code = "import boto3; print(boto3.client('s3').meta.endpoint_url)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", **sandbox.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == sandbox.s3_endpoint
    assert Path(sandbox.env["MODEL_DEPLOYER_CONFIG"]) == sandbox.config_path


def test_private_s3_endpoint(s3: S3Endpoint) -> None:
    client = s3.client()
    assert client.meta.endpoint_url == s3.endpoint_url
    client.put_object(Bucket=s3.bucket, Key="a/b.txt", Body=b"x")
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket)["Contents"]] == ["a/b.txt"]
    s3.reset()
    assert s3.client().list_objects_v2(Bucket=s3.bucket)["KeyCount"] == 0
