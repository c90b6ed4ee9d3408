"""Pre-flight facts of the GPU host in one go, for ``validate-components``: one JSON object.

Stdlib only, Python 3.8+: it runs with the host's stock ``python3``. model-deployer passes this
file's text as the program of one remote command, with one JSON argument saying what to do::

    python3 -c <this file> '{"probe": [...], "commands": {...}, "space": {...}, ...}'

    probe      {"argv", "stdin"}: the host probe (``deployer/remote/probe_host.py``), run as
               is; its output comes back verbatim for the operator's side to validate
    commands   {name: argv}: commands whose exit status is the answer (``sudo -n true``,
               ``sudo -n -l systemctl daemon-reload``, ``python3 -m venv --help``, ...)
    space      {name: path}: free bytes of the filesystem holding path (nearest existing dir)
    aws        {"profile", "endpoint", "bucket", "venv_python"}: where the SSH user's AWS
               credentials would come from, and whether the S3 endpoint answers from here
    health     true: when the probe finds a deployment, GET /health and /status on loopback
    timeout    seconds for each command

Everything starts at once (one thread each), so the answer costs about as long as the slowest
part. Nothing is changed: the commands are chosen by the caller to be read-only, credentials
are only located (never printed), and HTTP requests are GET/HEAD (plus the instance metadata
service's token request, which is how it is read).

The JSON shapes are spelled out as ``TypedDict`` classes for the type checker; annotations stay
unevaluated (``from __future__ import annotations``), so the script still runs on 3.8.
"""

from __future__ import annotations

import configparser
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Generic, TypedDict, TypeVar

if TYPE_CHECKING:  # annotations only: never evaluated at run time
    from collections.abc import Callable, Mapping

T = TypeVar("T")

OUT_MAX = 1000
PROBE_OUT_MAX = 1024 * 1024
BODY_MAX = 64 * 1024
HTTP_TIMEOUT = 3.0
IMDS = "http://169.254.169.254"
IMDS_TIMEOUT = 1.0
INDIRECT_KEYS = (
    "credential_process",
    "sso_session",
    "sso_start_url",
    "role_arn",
    "web_identity_token_file",
)
# Run by the service venv's python when it exists: boto3's own credential chain decides.
BOTO_SNIPPET = """
import json, sys
try:
    import boto3
except Exception as exc:
    print(json.dumps({"error": "boto3 not importable: %s" % type(exc).__name__}))
    sys.exit(0)
profile = sys.argv[1] or None
try:
    creds = boto3.Session(profile_name=profile).get_credentials()
except Exception as exc:
    print(json.dumps({"method": None, "detail": "%s: %s" % (type(exc).__name__, exc)}))
    sys.exit(0)
print(json.dumps({"method": creds.method if creds is not None else None}))
"""


# ----------------------------------------------------------------------------- JSON shapes


class ProbeSpec(TypedDict, total=False):
    argv: list[str]
    stdin: str | None


class AwsSpec(TypedDict, total=False):
    profile: str | None
    endpoint: str | None
    bucket: str | None
    venv_python: str | None


class Spec(TypedDict, total=False):
    """The caller's one JSON argument (see the module docstring)."""

    probe: ProbeSpec
    commands: dict[str, list[str]]
    space: dict[str, str]
    aws: AwsSpec | None
    health: bool
    timeout: float | None


class CommandRun(TypedDict):
    code: int | None  # None: it could not run (not found, timed out)
    out: str
    err: str
    elapsed_s: float


class Space(TypedDict):
    path: str
    measured_path: str
    free_bytes: int


class SpaceError(TypedDict):
    path: str
    error: str


class _AwsStatus(TypedDict):
    status: str  # found | indirect | none
    source: str | None


class AwsAnswer(_AwsStatus, total=False):
    detail: str | None
    profile: str
    user: str


class Endpoint(TypedDict, total=False):
    url: str
    reachable: bool
    http_status: int
    error: str


class Fetched(TypedDict, total=False):
    code: int | None
    body: str
    error: str


class Health(TypedDict):
    port: int
    health: Fetched
    status: Fetched


class TaskError(TypedDict):
    error: str


class _ResultRequired(TypedDict):
    hostname: str
    python: dict[str, str]
    space: dict[str, Space | SpaceError]
    commands: dict[str, CommandRun | TaskError]
    duration_s: float


class Result(_ResultRequired, total=False):
    """What the script prints; ``probe``/``health`` and ``aws`` only when the spec asks."""

    probe: CommandRun | TaskError
    health: Health | None
    # the answer (or why none), with "endpoint": endpoint_reachable's or None
    aws: dict[str, object]


class Fatal(TypedDict):
    fatal: str


def run_command(
    argv: list[str],
    timeout: float,
    out_max: int = OUT_MAX,
    env_extra: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> CommandRun:
    """{"code", "out", "err", "elapsed_s"} of one command; code None when it could not run."""
    started = time.monotonic()
    env = dict(os.environ, LC_ALL="C", LANG="C", **(env_extra or {}))
    code: int | None
    try:
        proc = subprocess.run(
            argv,
            input=stdin,  # fed on stdin when given, else stdin is /dev/null
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except FileNotFoundError:
        code, out, err = None, "", argv[0] + ": not found"
    except subprocess.TimeoutExpired:
        code, out, err = None, "", f"timed out after {timeout:g}s"
    except OSError as exc:
        code, out, err = None, "", f"{argv[0]}: {exc}"
    return {
        "code": code,
        "out": out[:out_max],
        "err": " ".join(err.split())[-OUT_MAX:],
        "elapsed_s": round(time.monotonic() - started, 4),
    }


def free_space(path: str) -> Space:
    measured = os.path.abspath(path)
    while not os.path.isdir(measured) and measured != os.path.dirname(measured):
        measured = os.path.dirname(measured)
    st = os.statvfs(measured)
    return {"path": path, "measured_path": measured, "free_bytes": st.f_bavail * st.f_frsize}


# ----------------------------------------------------------------------------- AWS


def _read_ini(path: str) -> configparser.RawConfigParser | None:
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    return parser


def _from_files(profile: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """Where the shared files give credentials for ``profile``: (status, source) or None."""
    home = os.path.expanduser("~")
    creds_file = env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials")
    config_file = env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
    creds = _read_ini(creds_file) if os.path.isfile(creds_file) else None
    keys = ("aws_access_key_id", "aws_secret_access_key")
    if creds is not None and all(creds.has_option(profile, key) for key in keys):
        return "found", f"shared credentials file {creds_file} [{profile}]"
    config = _read_ini(config_file) if os.path.isfile(config_file) else None
    section = profile if profile == "default" else "profile " + profile
    if config is None or not config.has_section(section):
        return None
    if config.has_option(section, "aws_access_key_id"):
        return "found", f"config file {config_file} [{section}]"
    for key in INDIRECT_KEYS:
        if config.has_option(section, key):
            return "indirect", f"config file {config_file} [{section}] uses {key}"
    return None


def _from_imds() -> str | None:
    """The instance profile's role name from the EC2 metadata service (IMDSv2), or None."""
    token_req = urllib.request.Request(  # noqa: S310 (a fixed http URL)
        IMDS + "/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    try:
        with urllib.request.urlopen(token_req, timeout=IMDS_TIMEOUT) as resp:  # noqa: S310
            token = resp.read().decode()
        role_req = urllib.request.Request(  # noqa: S310
            IMDS + "/latest/meta-data/iam/security-credentials/",
            headers={"X-aws-ec2-metadata-token": token},
        )
        with urllib.request.urlopen(role_req, timeout=IMDS_TIMEOUT) as resp:  # noqa: S310
            role = resp.read().decode().strip().splitlines()
    except (OSError, ValueError):
        return None
    return role[0] if role else None


def aws_stdlib(profile: str, env: Mapping[str, str]) -> AwsAnswer:
    """{"status": found|indirect|none, "source"} without boto3."""
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return {"status": "found", "source": "environment variables"}
    found = _from_files(profile, env)
    if found is not None:
        return {"status": found[0], "source": found[1]}
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    ):
        return {"status": "found", "source": "container credentials endpoint"}
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"):
        return {"status": "indirect", "source": "web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)"}
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        role = _from_imds()
        if role:
            return {"status": "found", "source": "instance profile " + role}
    return {"status": "none", "source": None}


def aws_venv(python: str, profile: str, timeout: float) -> AwsAnswer | None:
    """boto3's answer from the service venv, or None when it cannot give one."""
    env_extra = {"AWS_METADATA_SERVICE_TIMEOUT": "1", "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1"}
    result = run_command([python, "-c", BOTO_SNIPPET, profile], timeout, env_extra=env_extra)
    if result["code"] != 0:
        return None
    try:
        data = json.loads(result["out"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    if not isinstance(data, dict) or "error" in data:
        return None
    method = data.get("method")
    if method:
        return {"status": "found", "source": "boto3 in the service venv: " + str(method)}
    return {"status": "none", "source": "boto3 in the service venv", "detail": data.get("detail")}


def endpoint_reachable(endpoint: str, bucket: str) -> Endpoint:
    """HEAD <endpoint>/<bucket> unsigned: any HTTP answer means S3 is reachable from here."""
    url = endpoint.rstrip("/") + "/" + bucket
    request = urllib.request.Request(url, method="HEAD")  # noqa: S310 (http(s) from config)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:  # noqa: S310
            return {"url": url, "reachable": True, "http_status": resp.status}
    except urllib.error.HTTPError as exc:
        return {"url": url, "reachable": True, "http_status": exc.code}
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"url": url, "reachable": False, "error": str(reason)}


def aws(spec: AwsSpec, timeout: float) -> AwsAnswer:
    explicit = spec.get("profile") or os.environ.get("AWS_PROFILE") or ""
    profile = explicit or "default"
    answer: AwsAnswer | None = None
    python = spec.get("venv_python")
    if python and os.access(python, os.X_OK):
        answer = aws_venv(python, explicit, timeout)
    if answer is None:
        answer = aws_stdlib(profile, os.environ)
    answer["profile"] = profile
    answer["user"] = _user()
    return answer


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


# ----------------------------------------------------------------------------- health


def fetch(url: str) -> Fetched:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:  # noqa: S310 (loopback)
            return {"code": resp.status, "body": resp.read(BODY_MAX).decode("utf-8", "replace")}
    except urllib.error.HTTPError as exc:
        return {"code": exc.code, "body": exc.read(BODY_MAX).decode("utf-8", "replace")}
    except (OSError, ValueError) as exc:
        return {"code": None, "error": str(getattr(exc, "reason", exc))}


def deployed_port(probe_stdout: str) -> int | None:
    """The port of the deployment the probe found, or None."""
    try:
        lines = [line for line in probe_stdout.splitlines() if line.strip()]
        state = json.loads(lines[-1]).get("deployed") if lines else None
    except (ValueError, AttributeError):
        return None
    port = state.get("port") if isinstance(state, dict) else None
    return port if isinstance(port, int) and 0 < port < 65536 else None


def health(port: int) -> Health:
    base = f"http://127.0.0.1:{int(port)}"
    return {"port": port, "health": fetch(base + "/health"), "status": fetch(base + "/status")}


# ----------------------------------------------------------------------------- main


class Task(Generic[T]):
    """One callable in its own thread; ``wait`` gives what it returned, or why it did not."""

    def __init__(self, name: str, func: Callable[[], T]) -> None:
        self._result: T | TaskError = {"error": "timed out"}
        self._thread = threading.Thread(target=self._run, args=(func,), name=name, daemon=True)
        self._thread.start()

    def _run(self, func: Callable[[], T]) -> None:
        try:
            self._result = func()
        except Exception as exc:  # reported, never a traceback
            self._result = {"error": f"{type(exc).__name__}: {exc}"}

    def wait(self, timeout: float) -> T | TaskError:
        self._thread.join(timeout)
        return self._result


def validate(spec: Spec) -> Result:
    started = time.monotonic()
    timeout = float(spec.get("timeout") or 10.0)
    probe_spec = spec.get("probe")
    probe_task = None
    if probe_spec:
        probe_argv = probe_spec["argv"]
        probe_stdin = probe_spec.get("stdin")
        probe_task = Task(
            "probe",
            lambda: run_command(probe_argv, timeout * 3, PROBE_OUT_MAX, None, probe_stdin),
        )
    commands = spec.get("commands") or {}
    command_tasks = {
        name: Task("cmd:" + name, functools.partial(run_command, argv, timeout))
        for name, argv in sorted(commands.items())
    }
    aws_spec = spec.get("aws")
    aws_task = endpoint_task = None
    if aws_spec is not None:
        aws_task = Task("aws", lambda: aws(aws_spec, timeout))
        endpoint, bucket = aws_spec.get("endpoint"), aws_spec.get("bucket")
        if endpoint and bucket:
            endpoint_task = Task("endpoint", lambda: endpoint_reachable(endpoint, bucket))
    space: dict[str, Space | SpaceError] = {}
    for name, path in (spec.get("space") or {}).items():
        try:
            space[name] = free_space(path)
        except OSError as exc:
            space[name] = {"path": path, "error": str(exc)}
    out: Result = {
        "hostname": socket.gethostname(),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "space": space,
        "commands": {},
        "duration_s": 0.0,
    }
    grace = timeout * 3 + 5
    if probe_task is not None:
        probe = out["probe"] = probe_task.wait(grace)
        probe_out = probe.get("out")  # none when the task failed
        port = (
            deployed_port(probe_out) if spec.get("health") and isinstance(probe_out, str) else None
        )
        out["health"] = health(port) if port else None
    out["commands"] = {name: task.wait(grace) for name, task in command_tasks.items()}
    if aws_task is not None:
        answer: dict[str, object] = dict(aws_task.wait(grace))
        answer["endpoint"] = endpoint_task.wait(grace) if endpoint_task is not None else None
        out["aws"] = answer
    out["duration_s"] = round(time.monotonic() - started, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    result: Result | Fatal
    try:
        spec: Spec = json.loads(argv[0]) if argv else {}
        result = validate(spec)
    except Exception as exc:  # the caller reads JSON
        result = {"fatal": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0 if "fatal" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
