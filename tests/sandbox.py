"""Pytest plugin: the sandbox GPU host and the S3 endpoints tests run against.

Fixtures
    sandbox        (session) the booted sandbox host: a systemd + sshd Debian container at
                   10.77.0.2 with the Flux stand-in and the nvidia-smi test double, and moto S3
                   at 10.77.0.1:9000 (see scripts/sandbox/). Reuses a running sandbox
                   (`make sandbox`); otherwise boots one and brings it down at session end.
    fresh_sandbox  (function) the same host, reset to its boot state before the test.
    s3             (function) a private moto S3 endpoint on 127.0.0.1 with an empty bucket,
                   for tests that need S3 but not the host (no root needed).

Mark tests that use the host with ``@pytest.mark.sandbox``. ``pytest --keep-sandbox`` leaves a
sandbox the session booted running afterwards.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SANDBOX_SCRIPTS = REPO_ROOT / "scripts" / "sandbox"
SANDBOX_STATE = REPO_ROOT / ".sandbox"
GPU_STATE_FILE = "/etc/nvidia-smi-double/state.json"

# Host keys are verified against the sandbox's known_hosts only; never added, never skipped.
SSH_OPTIONS = {
    "BatchMode": "yes",
    "StrictHostKeyChecking": "yes",
    "GlobalKnownHostsFile": "/dev/null",
    "IdentitiesOnly": "yes",
    "ConnectTimeout": "5",
}

__all__ = ["S3Endpoint", "SandboxHost", "sandbox_running", "wait_until"]

# The environment as pytest started, before the per-test fixture clears AWS_* and
# MODEL_DEPLOYER_*: the sandbox scripts need the caller's HOME and MODEL_DEPLOYER_CACHE.
_LAUNCH_ENV = dict(os.environ)

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.2, what: str = "it"
) -> T:
    """Call ``probe`` until it returns something other than None/False; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
        except Exception as exc:  # the probe's failure is the condition we are waiting out
            last_error = exc
            result = None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def _boto3_session(credentials_file: Path, config_file: Path) -> Any:
    """A boto3 session that reads exactly these shared files (the standard credential chain)."""
    import boto3
    import botocore.session

    core = botocore.session.Session()
    core.set_config_variable("credentials_file", str(credentials_file))
    core.set_config_variable("config_file", str(config_file))
    return boto3.Session(botocore_session=core)


@dataclass(frozen=True)
class SandboxHost:
    """A booted sandbox host, as described by ``.sandbox/config.toml``."""

    config_path: Path
    address: str
    ssh_port: int
    user: str
    key_file: Path
    known_hosts: Path
    s3_endpoint: str
    bucket: str
    region: str
    env: dict[str, str] = field(repr=False)

    @classmethod
    def from_state(cls, state: Path = SANDBOX_STATE) -> SandboxHost:
        config_path = state / "config.toml"
        config = tomllib.loads(config_path.read_text())
        host, s3 = config["host"], config["s3"]
        env = {
            "AWS_SHARED_CREDENTIALS_FILE": str(state / "aws" / "credentials"),
            "AWS_CONFIG_FILE": str(state / "aws" / "config"),
            "AWS_ENDPOINT_URL": s3["endpoint_url"],
            "MODEL_DEPLOYER_CONFIG": str(config_path),
            # The tests consent to every change on their own sandbox host; the consent tests
            # take this out.
            "MODEL_DEPLOYER_YES": "1",
        }
        return cls(
            config_path=config_path,
            address=host["address"],
            ssh_port=int(host["port"]),
            user=host["user"],
            key_file=Path(host["key_file"]),
            known_hosts=Path(host["known_hosts"]),
            s3_endpoint=s3["endpoint_url"],
            bucket=s3["bucket"],
            region=s3["region"],
            env=env,
        )

    # -- ssh ------------------------------------------------------------------------------
    def ssh_argv(self, command: str, *, known_hosts: Path | None = None) -> list[str]:
        """System ssh with host keys verified, no agent keys and no user ssh config."""
        options = {**SSH_OPTIONS, "UserKnownHostsFile": str(known_hosts or self.known_hosts)}
        argv = ["ssh", "-F", "/dev/null"]
        for name, value in options.items():
            argv += ["-o", f"{name}={value}"]
        argv += ["-i", str(self.key_file), "-p", str(self.ssh_port), "-l", self.user]
        return [*argv, self.address, "--", command]

    def ssh(
        self, command: str, *, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command line on the host as the ssh user."""
        result = subprocess.run(
            self.ssh_argv(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ssh {command!r} exited {result.returncode}\n"
                f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
            )
        return result

    def sudo(self, command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a shell command line on the host as root (passwordless sudo)."""
        return self.ssh(f"sudo -n sh -c {shlex.quote(command)}", **kwargs)

    # -- host state -----------------------------------------------------------------------
    def reset(self) -> None:
        """Return the host to its boot state: no inference unit or install, no test units,
        Flux stand-in enabled, active and healthy, nvidia-smi double back to its defaults."""
        self.ssh("sudo -n /usr/local/sbin/sandbox-reset", timeout=120)

    def gpu_state(self) -> dict[str, Any]:
        """The nvidia-smi test double's state file."""
        return json.loads(self.ssh(f"cat {GPU_STATE_FILE}").stdout)

    def update_gpu_state(self, **changes: Any) -> None:
        """Merge ``changes`` into the double's state (flux_mib, units, processes, ...)."""
        script = (
            "import json, sys; p = sys.argv[1]; s = json.load(open(p));"
            " s.update(json.loads(sys.argv[2])); open(p, 'w').write(json.dumps(s))"
        )
        self.ssh(
            f"sudo -n python3 -c {shlex.quote(script)} {GPU_STATE_FILE} "
            f"{shlex.quote(json.dumps(changes))}"
        )

    def set_flux_gpu_mib(self, mib: int) -> None:
        """GPU memory the double reports for flux-api.service while it is active."""
        self.update_gpu_state(flux_mib=int(mib))

    def unit_property(self, unit: str, prop: str) -> str:
        return self.ssh(
            f"systemctl show --property={prop} --value {shlex.quote(unit)}"
        ).stdout.strip()

    def url(self, port: int, path: str = "/") -> str:
        return f"http://{self.address}:{port}{path}"

    # -- S3 -------------------------------------------------------------------------------
    def s3_client(self) -> Any:
        """boto3 S3 client configured only by the sandbox's shared AWS files."""
        return _boto3_session(
            Path(self.env["AWS_SHARED_CREDENTIALS_FILE"]), Path(self.env["AWS_CONFIG_FILE"])
        ).client("s3")

    def clear_bucket(self) -> None:
        _empty_bucket(self.s3_client(), self.bucket)


def _empty_bucket(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _pid_is(pidfile: Path, comm: str) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith(comm)
    except (OSError, ValueError):
        return False


def sandbox_running(state: Path = SANDBOX_STATE) -> bool:
    return (
        (state / "config.toml").is_file()
        and _pid_is(state / "nspawn.pid", "systemd-nspawn")
        and _pid_is(state / "moto.pid", "moto_server")
    )


def _run_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SANDBOX_SCRIPTS / name), *args],
        env=_LAUNCH_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--keep-sandbox",
        action="store_true",
        default=False,
        help="leave a sandbox host that this session booted running at the end",
    )


@pytest.fixture(scope="session")
def sandbox(request: pytest.FixtureRequest) -> Iterator[SandboxHost]:
    """The sandbox host; reused when already up, else booted now and stopped at session end."""
    booted = False
    if not sandbox_running():
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.fail(
                "the sandbox host is not up and booting it needs root: run `sudo make sandbox`",
                pytrace=False,
            )
        booted = True
        try:
            up = _run_script("up", timeout=900)
        except subprocess.TimeoutExpired:
            _run_script("down", timeout=120)
            raise
        if up.returncode != 0:
            _run_script("down", timeout=120)
            pytest.fail(f"scripts/sandbox/up failed ({up.returncode}):\n{up.stderr[-4000:]}")
    try:
        host = SandboxHost.from_state()
        wait_until(
            lambda: host.ssh("true", check=False, timeout=10).returncode == 0,
            timeout=60,
            what="an ssh login to the sandbox host",
        )
        yield host
    finally:
        if booted and not request.config.getoption("--keep-sandbox"):
            down = _run_script("down", timeout=120)
            if down.returncode != 0:
                sys.stderr.write(f"scripts/sandbox/down failed:\n{down.stderr[-4000:]}\n")


@pytest.fixture
def fresh_sandbox(sandbox: SandboxHost) -> SandboxHost:
    """The sandbox host reset to its boot state before the test."""
    sandbox.reset()
    return sandbox


@dataclass(frozen=True)
class S3Endpoint:
    """A private moto S3 server with one bucket, configured through shared AWS files."""

    endpoint_url: str
    bucket: str
    region: str
    config_dir: Path
    env: dict[str, str] = field(repr=False)

    def client(self) -> Any:
        return _boto3_session(self.config_dir / "credentials", self.config_dir / "config").client(
            "s3"
        )

    def reset(self) -> None:
        """Forget every bucket and object, then create the empty bucket again."""
        import httpx

        httpx.post(f"{self.endpoint_url}/moto-api/reset", timeout=10).raise_for_status()
        self.client().create_bucket(
            Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": self.region}
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """moto_server on 127.0.0.1 for the session (see the ``s3`` fixture)."""
    import httpx

    config_dir = tmp_path_factory.mktemp("aws")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    region = "us-west-2"
    (config_dir / "credentials").write_text(
        "[default]\naws_access_key_id = test-access-key\naws_secret_access_key = test-secret\n"
    )
    (config_dir / "config").write_text(f"[default]\nregion = {region}\nendpoint_url = {endpoint}\n")
    moto = Path(sys.executable).with_name("moto_server")
    log = (config_dir / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=_LAUNCH_ENV,
    )
    try:
        wait_until(
            lambda: proc.poll() is None and httpx.get(endpoint, timeout=1).status_code < 500,
            timeout=30,
            what=f"moto_server on {endpoint} (log: {config_dir / 'moto.log'})",
        )
        server = S3Endpoint(
            endpoint_url=endpoint,
            bucket="asoba-llm-cache",
            region=region,
            config_dir=config_dir,
            env={
                "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
                "AWS_CONFIG_FILE": str(config_dir / "config"),
                "AWS_ENDPOINT_URL": endpoint,
            },
        )
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture
def s3(s3_server: S3Endpoint) -> S3Endpoint:
    """A private S3 endpoint whose bucket is empty at the start of the test."""
    s3_server.reset()
    return s3_server
