"""Shell injection: hostile model names never get near the host, and every remote argument is
quoted by the one helper (``deployer.ssh.remote_command``).

* Names built to inject shell (``;``, ``$(...)``, backticks, spaces, ``../``, newlines, ``|``,
  ``&``, quotes, a leading ``-``) are refused by ``deploy-model`` with one line and exit 2
  before any SSH or S3 connection: the SSH layer is replaced by a tripwire, and a valid name
  shows that the tripwire does fire.
* Catalog and config values carrying such payloads are refused at load.
* Structurally (AST): every ``Executor.run`` call in ``deployer/`` gets an argv, never a
  command string made with an f-string, ``+``, ``%``, ``format`` or ``join``.
* At runtime: the exact strings that ``SSHHost.run`` hands to Fabric, for real code paths fed
  payload-laden paths and values, split back (``shlex`` and a real ``bash``) into exactly the
  intended argv, and nothing in them runs.
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fabric
import paramiko
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer import cli, cli_ops, s3
from deployer.audit import AuditEntry
from deployer.audit import append as audit_append
from deployer.audit import tail as audit_tail
from deployer.catalog import load_catalog, parse_catalog
from deployer.config import HostConfig, InstallConfig, S3Config, Settings, load_settings
from deployer.errors import CatalogError, ConfigError, ConnectError, DeployError
from deployer.lock import HostLock
from deployer.pull import pull_request, run_pull
from deployer.releases import Release, Releases
from deployer.service_code import install_venv
from deployer.ssh import SSHHost
from deployer.unit import FileWrite, write_file
from tests.local_executor import LocalExecutor

CATALOG = load_catalog()
DEPLOYER_DIR = Path(cli.__file__).resolve().parent

#: Model names built to inject shell or escape a path; none is a catalog entry.
HOSTILE_NAMES = [
    "a;reboot",
    "demo-tiny;reboot",
    "demo-tiny && reboot",
    "$(reboot)",
    "demo-tiny$(reboot)",
    "`reboot`",
    "demo tiny",
    " demo-tiny",
    "../demo-tiny",
    "demo-tiny/../../etc",
    "..",
    "demo-tiny\n",
    "demo-tiny\nreboot",
    "demo-tiny|reboot",
    "demo-tiny&",
    "demo-tiny'",
    'demo-tiny"',
    "demo-tiny\\",
    "demo-tiny>x",
    "demo-tiny*",
    "démo-tiny",
    "demo-tiny\x00",
    "demo-tiny\x1b[2J",
    "x" * 65,
]
DASH_NAMES = ["-rf", "--help", "-demo-tiny", "--config=/etc/passwd"]


# ------------------------------------------------------------------------------ tripwire


@dataclass
class Tripwire:
    """Every way to reach the host or S3, replaced by a recorder that refuses."""

    attempts: list[str] = field(default_factory=list)

    def hook(self, what: str) -> Any:
        def refuse(*args: object, **kwargs: object) -> None:
            self.attempts.append(what)
            raise ConnectError(f"tripwire: {what}")

        return refuse


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Tripwire:
    wire = Tripwire()
    monkeypatch.setattr(SSHHost, "__init__", wire.hook("SSHHost.__init__"))
    monkeypatch.setattr(SSHHost, "open", wire.hook("SSHHost.open"))
    monkeypatch.setattr(SSHHost, "run", wire.hook("SSHHost.run"))
    monkeypatch.setattr(fabric.Connection, "open", wire.hook("fabric.Connection.open"))
    monkeypatch.setattr(paramiko.SSHClient, "connect", wire.hook("paramiko.SSHClient.connect"))
    monkeypatch.setattr(s3, "make_client", wire.hook("s3.make_client"))
    # A configured host, so only the name can stop the command; no ./model-deployer.toml.
    monkeypatch.setenv("MODEL_DEPLOYER_HOST__ADDRESS", "192.0.2.1")
    monkeypatch.setenv("MODEL_DEPLOYER_HOST__KNOWN_HOSTS", str(tmp_path / "known_hosts"))
    monkeypatch.chdir(tmp_path)
    return wire


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and lines[0].isprintable(), lines
    return lines[0]


def deploy(args: list[str]) -> Any:
    return CliRunner().invoke(cli.main, args)


# ------------------------------------------------------------------------------ deploy-model


def test_tripwire_fires_for_a_valid_name(tripwire: Tripwire) -> None:
    """The control: a catalog name does go on to connect, so the tripwire is in the path."""
    for args in (["demo-tiny", "--dry-run"], ["demo-tiny"]):
        result = deploy(args)
        assert result.exit_code == 3, result.output
        assert "tripwire: SSHHost.__init__" in one_error_line(result.stderr)
    assert tripwire.attempts == ["SSHHost.__init__", "SSHHost.__init__"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "apply"])
def test_hostile_model_name_is_refused_before_any_connection(
    tripwire: Tripwire, name: str, dry_run: bool
) -> None:
    args = [name, "--dry-run"] if dry_run else [name]
    result = deploy(args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert "invalid model name" in line
    assert result.stdout == ""
    assert tripwire.attempts == []


@pytest.mark.parametrize("name", DASH_NAMES)
def test_names_with_a_leading_dash_are_refused_before_any_connection(
    tripwire: Tripwire, name: str
) -> None:
    # After `--` the word is the NAME: refused by the name check.
    result = deploy(["--dry-run", "--", name])
    assert result.exit_code == 2
    assert "invalid model name" in one_error_line(result.stderr)
    # Without `--` click takes it for an option: a usage error, also exit 2.
    result = deploy([name, "--dry-run"])
    assert result.exit_code in (0, 2)  # --help prints the help and exits 0
    assert "Traceback (most recent call last)" not in result.output
    if result.exit_code == 2:  # a usage error (Error: ...) or --config=... read (error: ...)
        errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
        assert len(errors) == 1, result.stderr
    assert tripwire.attempts == []


NAME_TEXT = st.one_of(
    st.sampled_from(sorted(CATALOG.models)),
    st.text(
        alphabet=st.sampled_from(list("demo-tiny_.0") + list(" ;$()`|&'\"\n\\/<>*?!#~{}-\t")),
        min_size=1,
        max_size=16,
    ),
    st.builds(lambda n, p: n + p, st.sampled_from(sorted(CATALOG.models)), st.text(max_size=4)),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(name=NAME_TEXT)
def test_only_catalog_names_ever_reach_the_host(tripwire: Tripwire, name: str) -> None:
    tripwire.attempts.clear()
    result = deploy(["--dry-run", "--", name])
    if name in CATALOG.models:
        assert result.exit_code == 3 and tripwire.attempts == ["SSHHost.__init__"]
    else:
        assert result.exit_code == 2, result.output
        assert "model" in one_error_line(result.stderr)  # invalid model name / unknown model
        assert tripwire.attempts == []


# ------------------------------------------------------------------------------ model-deployer

#: No subcommand of model-deployer takes a model name: the model comes from the host's state.
#: A name given anyway is an extra argument click refuses (exit 2) before the work starts.
SUBCOMMANDS = [["status"], ["logs"], ["undeploy"], ["rollback"], ["audit"], ["unlock"]]
OPS_PAYLOADS = [
    "a;reboot",
    "$(reboot)",
    "`reboot`",
    "two words",
    "../x",
    "a|b",
    "a&b",
    "'\"",
    "-rf",
]


def ops(args: list[str]) -> Any:
    return CliRunner().invoke(cli_ops.main, args)


def test_model_deployer_subcommands_take_no_model_name() -> None:
    for name, command in cli_ops.main.commands.items():
        arguments = [p.name for p in command.params if p.param_type_name == "argument"]
        assert arguments == (["action"] if name == "flux" else []), (name, arguments)


def test_model_deployer_tripwire_fires_without_payload(tripwire: Tripwire) -> None:
    for args in [*SUBCOMMANDS, ["flux", "status"]]:
        tripwire.attempts.clear()
        result = ops(args)
        assert result.exit_code == 3, (args, result.output)
        assert tripwire.attempts == ["SSHHost.__init__"]


@pytest.mark.parametrize("payload", OPS_PAYLOADS)
def test_model_deployer_refuses_a_model_name_before_any_connection(
    tripwire: Tripwire, payload: str
) -> None:
    for args in [*[[*sub, "--", payload] for sub in SUBCOMMANDS], ["flux", "--", payload]]:
        result = ops(args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and payload in errors[0], result.stderr
    assert tripwire.attempts == []


def test_model_deployer_hostile_config_path_is_one_line_before_any_connection(
    tripwire: Tripwire, tmp_path: Path
) -> None:
    result = ops(["--config", str(tmp_path / "$(reboot);x.toml"), "status"])
    assert result.exit_code == 2
    assert "cannot read config" in one_error_line(result.stderr)
    bad = tmp_path / "bad.toml"
    bad.write_text('[remote]\nstate_dir = "/var/lib/$(reboot)"\n')
    result = ops(["--config", str(bad), "unlock"])
    assert result.exit_code == 2
    assert "remote.state_dir" in one_error_line(result.stderr)
    assert tripwire.attempts == []


# ------------------------------------------------------------------------------ catalog payloads

SHELL_PAYLOADS = ["$(reboot)", "`reboot`", "a;reboot", "a b", "a\nb", "a|b", "a&b", "a'b", 'a"b']


def entry(**over: object) -> dict[str, object]:
    return {"tier": "raw", "s3_prefix": "models/m/", "parameters_b": 1.0, "size_gb": 2.0, **over}


def catalog_error(data: dict[str, object]) -> str:
    with pytest.raises(CatalogError) as info:
        parse_catalog(data)
    message = info.value.message
    assert message.splitlines() == [message] and message.isprintable(), message
    return message


@pytest.mark.parametrize("payload", [*SHELL_PAYLOADS, "-rf", "../../etc/passwd"])
def test_catalog_fields_with_payloads_are_rejected(payload: str) -> None:
    cases = [
        ("asoba-llm-cache", entry(s3_prefix=f"{payload}/"), "models.m.s3_prefix: "),
        ("asoba-llm-cache", entry(revision=payload), "models.m.revision: "),
        ("asoba-llm-cache", entry(awq_variant=payload), "models.m.awq_variant: no model"),
        (payload, entry(), "bucket: not a valid S3 bucket name"),
    ]
    if payload != "-rf":  # a dash inside a key prefix is an ordinary S3 key character
        cases.append(
            ("asoba-llm-cache", entry(s3_prefix=f"models/{payload}/"), "models.m.s3_prefix: ")
        )
    for bucket, model, expected in cases:
        assert expected in catalog_error({"bucket": bucket, "models": {"m": model}})


@pytest.mark.parametrize(
    "script",
    [
        "scripts/$(reboot).sh",
        "scripts/`reboot`.sh",
        "scripts/a;reboot.sh",
        "scripts/a b.sh",
        "scripts/a\nreboot.sh",
        "scripts/a|b.sh",
        "scripts/a&b.sh",
        "scripts/a'b.sh",
        "-rf.sh",
        "scripts/a>b.sh",
    ],
)
def test_bootstrap_script_with_payload_is_rejected_even_when_the_file_exists(
    tmp_path: Path, script: str
) -> None:
    """The script must exist next to the catalog; a file with a hostile name is still refused
    (by the name's character set, not by its absence)."""
    target = tmp_path / script
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("#!/bin/sh\ntrue\n")
    data = {"bucket": "asoba-llm-cache", "models": {"m": entry(bootstrap={"script": script})}}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError, match=r"models\.m\.bootstrap\.script: must be a relative"):
        load_catalog(path)
    # The same catalog with a plain name loads: only the name was wrong.
    (tmp_path / "scripts").mkdir(exist_ok=True)
    (tmp_path / "scripts" / "ok_1.sh").write_text("true\n")
    data["models"]["m"]["bootstrap"] = {"script": "scripts/ok_1.sh"}  # type: ignore[index]
    path.write_text(yaml.safe_dump(data))
    assert load_catalog(path).models["m"].bootstrap is not None


# ------------------------------------------------------------------------------ config payloads

CONFIG_FIELDS = [
    ("HOST", "ADDRESS"),
    ("HOST", "USER"),
    ("REMOTE", "SERVICE_DIR"),
    ("REMOTE", "MODELS_DIR"),
    ("REMOTE", "STATE_DIR"),
    ("REMOTE", "SERVICE_NAME"),
    ("REMOTE", "FLUX_SERVICE"),
    ("REMOTE", "SERVICE_USER"),
    ("REMOTE", "PYTHON"),
    ("INSTALL", "WHEELHOUSE"),
    ("S3", "ENDPOINT_URL"),
    ("SERVICE", "MEMORY_MAX"),
    ("SERVICE", "CPU_QUOTA"),
]
#: A plausible value of each field, to which a payload is appended.
PLAUSIBLE = {
    "ADDRESS": "10.0.0.5",
    "USER": "ubuntu",
    "SERVICE_DIR": "/opt/svc",
    "MODELS_DIR": "/opt/models",
    "STATE_DIR": "/var/lib/md",
    "SERVICE_NAME": "x.service",
    "FLUX_SERVICE": "flux.service",
    "SERVICE_USER": "ubuntu",
    "PYTHON": "python3",
    "WHEELHOUSE": "/opt/wheels",
    "ENDPOINT_URL": "http://s3.local:9000",
    "MEMORY_MAX": "32G",
    "CPU_QUOTA": "800%",
}


@pytest.mark.parametrize(("section", "key"), CONFIG_FIELDS)
def test_config_values_with_payloads_are_rejected(section: str, key: str) -> None:
    plain = {f"MODEL_DEPLOYER_{section}__{key}": PLAUSIBLE[key]}
    load_settings(environ=plain)  # the plausible value itself is fine
    # A command name or a URL may hold "/../"; a directory may not.
    traversal = [] if key in ("PYTHON", "ENDPOINT_URL") else ["/../../etc"]
    for payload in [*SHELL_PAYLOADS, *traversal]:
        value = PLAUSIBLE[key] + payload
        with pytest.raises(ConfigError) as info:
            load_settings(environ={f"MODEL_DEPLOYER_{section}__{key}": value})
        message = info.value.message
        assert f"{section.lower()}.{key.lower()}" in message
        assert message.splitlines() == [message] and message.isprintable()


# ------------------------------------------------------------------------------ AST: argv only

RUN_EXEMPT = {
    # (file, callee text): calls named `run` that are not an Executor's
    ("service_code.py", "subprocess.run"),  # local `python -m build`, argv list, no shell
    ("ssh.py", "self._conn.run"),  # the Fabric boundary itself, checked on its own below
}
STRING_MAKERS = {"format", "format_map", "join", "shell_join", "remote_command", "quote", "str"}


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


class ArgvChecker:
    """Finds remote commands made as strings in one module's AST."""

    def __init__(self, tree: ast.Module, filename: str) -> None:
        self.tree = tree
        self.filename = filename
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node

    def _scope(self, node: ast.AST) -> ast.AST:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return node
        return self.tree

    def _bindings(self, name: str, at: ast.AST) -> Iterator[ast.expr]:
        """What ``name`` may hold at ``at``: its assignments in the scope (then the module),
        and a parameter's annotation."""
        for scope in (self._scope(at), self.tree):
            found = False
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets
                ):
                    found = True
                    yield node.value
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and (
                    isinstance(node.target, ast.Name) and node.target.id == name
                ):
                    found = True
                    if node.value is not None:
                        yield node.value
                elif isinstance(node, ast.arg) and node.arg == name:
                    found = True
                    if node.annotation is not None:
                        yield node.annotation
            if found:
                return

    def is_text(self, node: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
        """A string made by formatting (f-string, ``+``, ``%``, ``format``, ``join``, the
        quoting helpers) or a plain string constant."""
        if isinstance(node, ast.JoinedStr):
            return True
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
            return (
                isinstance(node.op, ast.Mod)
                or self.is_text(node.left, seen)
                or self.is_text(node.right, seen)
            )
        if isinstance(node, ast.Call):
            return _call_name(node.func) in STRING_MAKERS
        if isinstance(node, ast.IfExp):
            return self.is_text(node.body, seen) or self.is_text(node.orelse, seen)
        if isinstance(node, ast.Name) and node.id not in seen:
            if node.id == "str":  # an annotation `argv: str`
                return True
            return any(self.is_text(v, seen | {node.id}) for v in self._bindings(node.id, node))
        return False

    def is_formatted(self, node: ast.AST) -> bool:
        """``is_text`` but a plain constant is fine (code passed to ``python -c``)."""
        if isinstance(node, ast.Constant):
            return False
        if isinstance(node, ast.Name):
            return any(self.is_formatted(v) for v in self._bindings(node.id, node))
        return self.is_text(node)

    def violations(self) -> list[str]:
        found = []
        for node in ast.walk(self.tree):
            where = f"{self.filename}:{getattr(node, 'lineno', '?')}"
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "run"
                and node.args
                and (self.filename, ast.unparse(node.func)) not in RUN_EXEMPT
                and self.is_text(node.args[0])
            ):
                found.append(f"{where}: run() given a command string: {ast.unparse(node.args[0])}")
            if isinstance(node, ast.List):
                items = node.elts
                for i, item in enumerate(items[:-1]):
                    if (
                        isinstance(item, ast.Constant)
                        and item.value == "-c"
                        and self.is_formatted(items[i + 1])
                    ):
                        code = ast.unparse(items[i + 1])
                        found.append(f"{where}: code for -c built from values: {code}")
            if isinstance(node, ast.keyword) and node.arg == "shell":
                found.append(f"{where}: shell= keyword")
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen", "getoutput"):
                found.append(f"{where}: os.{node.attr}-style shell call")
        return found


def check_source(source: str, filename: str = "snippet.py") -> list[str]:
    return ArgvChecker(ast.parse(textwrap.dedent(source)), filename).violations()


def deployer_modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(DEPLOYER_DIR.glob("*.py")):
        yield path.name, ast.parse(path.read_text(encoding="utf-8"))


def test_every_remote_command_is_an_argv_list() -> None:
    violations = [
        v for name, tree in deployer_modules() for v in ArgvChecker(tree, name).violations()
    ]
    assert violations == []


def test_the_scan_sees_every_executor_call() -> None:
    """The scan is not vacuous: it visits the ~70 run() calls of the core."""
    calls = [
        node
        for _, tree in deployer_modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "run"
        and node.args
    ]
    assert len(calls) >= 60


@pytest.mark.parametrize(
    "source",
    [
        "ex.run(f'rm -rf {path}')",
        "ex.run('rm -rf ' + path)",
        "ex.run('rm -rf %s' % path)",
        "ex.run('rm -rf {}'.format(path))",
        "ex.run(' '.join(argv))",
        "ex.run(shell_join(argv))",
        "ex.run('systemctl daemon-reload')",
        "def f(ex, p):\n    cmd = f'cat {p}'\n    ex.run(cmd, sudo=True)",
        "def f(ex, p):\n    cmd = 'cat ' + p if p else 'true'\n    return ex.run(cmd)",
        "def f(ex, command: str):\n    ex.run(command)",
        "ex.run(['sh', '-c', f'rm {path}'])",
        "ex.run([python, '-c', 'print(%r)' % value])",
        "subprocess.run(cmd, shell=True)",
        "os.system('id')",
    ],
)
def test_the_scan_catches_commands_built_as_strings(source: str) -> None:
    assert check_source(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "ex.run(['rm', '-rf', '--', path], sudo=True)",
        "ex.run(commands.remove(path))",
        "ex.run([f'{venv}/bin/python', '-m', 'pip', 'install', f'{wheel}[server]'])",
        "def f(ex, argv: list[str]):\n    ex.run(argv)",
        "def f(ex, p):\n    pip = ['pip']\n    pip += ['--index-url', p]\n    ex.run([*pip, 'x'])",
        "CODE = 'import sys'\nex.run([python, '-c', CODE, arg])",
        "deployment.run()",
    ],
)
def test_the_scan_accepts_argv_lists(source: str) -> None:
    assert check_source(source) == []


def test_fabric_is_only_reached_through_remote_command() -> None:
    """The one string-taking call (Fabric's ``Connection.run``) gets ``remote_command(...)``,
    and only ssh.py quotes for a shell (unit.py quotes values in the profile.d file it writes,
    which is file content, not a command)."""
    trees = dict(deployer_modules())
    ssh = trees["ssh.py"]
    conn_runs = [
        n
        for n in ast.walk(ssh)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "self._conn.run"
    ]
    assert len(conn_runs) == 1 and isinstance(conn_runs[0].args[0], ast.Name)
    sent = conn_runs[0].args[0].id
    assignments = [
        n.value
        for n in ast.walk(ssh)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == sent for t in n.targets)
    ]
    assert [ast.unparse(a.func) for a in assignments if isinstance(a, ast.Call)] == [
        "remote_command"
    ]
    assert len(assignments) == 1
    quoting = {
        (name, ast.unparse(n.func))
        for name, tree in trees.items()
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("shlex.")
    }
    assert quoting == {("ssh.py", "shlex.join"), ("unit.py", "shlex.quote")}
    connections = [
        name
        for name, tree in trees.items()
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and _call_name(n.func) == "Connection"
    ]
    assert connections == ["ssh.py"]


# ------------------------------------------------------------------------------ runtime quoting

#: Arguments built to break out of quoting. Each `touch` would leave a canary file behind.
PAYLOAD_WORDS = [
    "a;touch canary-semicolon",
    "$(touch canary-subst)",
    "`touch canary-backtick`",
    "a|touch canary-pipe",
    "a&&touch canary-and",
    "a&touch canary-bg",
    "a\ntouch canary-newline",
    "a'$(touch canary-squote)'",
    'a"$(touch canary-dquote)"',
    "two  words\tand tab",
    "../../etc/passwd",
    "-rf",
    "*",
    "~root",
    "${HOME}",
    "a\\",
    "#not a comment",
    "{a,b}",
    ">canary-redirect",
    "é中\U0001f600",
    "",
]
HOSTILE_SEGMENT = "st ate;touch canary-dir|x&y$(touch canary-dir2)`id`'q\"\n*"


@dataclass
class FakeFabricConnection:
    """Stands in for ``fabric.Connection``: records the command line ``SSHHost.run`` sends and
    answers as a host with nothing on it (``cat``/``test``/``ls`` fail, the rest succeed)."""

    sent: list[str] = field(default_factory=list)
    is_connected: bool = True

    def run(self, command: str, **kwargs: object) -> SimpleNamespace:
        self.sent.append(command)
        words = shlex.split(command)
        while words and words[0] in ("sudo", "-n", "--"):
            words = words[1:]
        if words and words[0] == "env":
            words = [w for w in words[1:] if "=" not in w] or words
        failing = bool(words) and words[0] in ("cat", "test", "ls", "readlink")
        return SimpleNamespace(exited=1 if failing else 0, stdout="", stderr="")

    def close(self) -> None:
        self.is_connected = False


class RecordingHost(SSHHost):
    """A real ``SSHHost`` (same ``run``) whose Fabric connection is the fake above; it also
    records what each caller asked for."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(HostConfig(address="192.0.2.1", known_hosts=tmp / "known_hosts"))
        self._conn = FakeFabricConnection()  # type: ignore[assignment]
        self.asked: list[tuple[list[str], bool, dict[str, str]]] = []
        self.stdins: list[str] = []

    @property
    def sent(self) -> list[str]:
        return self._conn.sent  # type: ignore[attr-defined, no-any-return]

    def run(  # type: ignore[override]
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        self.asked.append(([str(a) for a in argv], sudo, dict(env or {})))
        self.stdins.append(str(kwargs.get("stdin") or ""))
        return super().run(argv, sudo=sudo, env=env, **kwargs)


def intended(argv: list[str], sudo: bool, env: dict[str, str]) -> list[str]:
    prefix = ["sudo", "-n", "--"] if sudo else []
    if env:
        prefix += ["env", *(f"{k}={v}" for k, v in sorted(env.items()))]
    return [*prefix, *argv]


def bash_words(command: str, cwd: Path) -> list[str]:
    """The words a real bash makes of ``command`` (printed, not run)."""
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", "printf '%s\\0' " + command],
        cwd=cwd,
        capture_output=True,
        timeout=10,
        check=True,
    )
    return proc.stdout.decode("utf-8").split("\0")[:-1]


def assert_sent_exactly_as_asked(host: RecordingHost, sandbox: Path) -> None:
    assert len(host.sent) == len(host.asked) > 0
    for command, (argv, sudo, env) in zip(host.sent, host.asked, strict=True):
        expected = intended(argv, sudo, env)
        assert shlex.split(command) == expected, command
        assert bash_words(command, sandbox) == expected, command
    assert sorted(p.name for p in sandbox.rglob("canary*")) == []


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """Where a payload that escaped its quotes would leave its canary files."""
    path = tmp_path / "sandbox"
    path.mkdir()
    return path


def test_real_code_paths_send_payload_laden_arguments_quoted(tmp_path: Path, sandbox: Path) -> None:
    """Lock, audit log, releases, file installs, the pull and the venv install, given hostile
    paths and values below the config's validation (defence in depth): every command line
    that reaches Fabric splits back into exactly the argv the code meant."""
    host = RecordingHost(tmp_path)
    hostile_dir = f"/srv/{HOSTILE_SEGMENT}"
    word = "deploy-model m;touch canary-free $(touch canary-free2)"  # free text
    audit_append(host, hostile_dir, AuditEntry(command=word, outcome="ok", model=word))
    assert audit_tail(host, hostile_dir) == []
    with pytest.raises(DeployError):
        HostLock(host, hostile_dir, command=word, warn=lambda _: None).acquire()
    store = Releases(host, hostile_dir)
    release = Release(
        model=word,
        revision="r1",
        model_path=f"{hostile_dir}/models/{PAYLOAD_WORDS[1]}",
        port=8001,
        quantization="none",
        service_name="x.service",
        unit_text="[Service]\n",
    )
    store.record(release, env_source=f"{hostile_dir}/{PAYLOAD_WORDS[2]}.env")
    for payload in PAYLOAD_WORDS:
        write_file(host, FileWrite(f"{hostile_dir}/{payload}", payload, owner="ubuntu"))
    risky = Settings(
        s3=S3Config(bucket=PAYLOAD_WORDS[4], region=PAYLOAD_WORDS[5]),
        install=InstallConfig(index_url=f"https://pypi.example/{PAYLOAD_WORDS[6]}"),
    )
    spec = CATALOG.models["demo-tiny"]
    with pytest.raises(DeployError):
        run_pull(host, pull_request(risky, spec, bucket="b"), python=f"{hostile_dir}/bin/python")
    wheel = tmp_path / "remote_service-0.1-py3-none-any.whl;touch canary-wheel"
    wheel.write_bytes(b"PK")
    install_venv(host, risky, wheel, ident=PAYLOAD_WORDS[7])

    assert_sent_exactly_as_asked(host, sandbox)
    words = [w for argv, _, env in host.asked for w in [*argv, *env.values()]]
    for payload in [*PAYLOAD_WORDS, HOSTILE_SEGMENT, "touch canary-wheel"]:
        assert any(payload in w for w in words), payload  # reached the host intact, as data
    # Free text (the operator's command line, the model name) travels on stdin only.
    assert not any(word in w for w in words)
    assert any(word in text for text in host.stdins)


ARG_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    argv=st.lists(ARG_TEXT | st.sampled_from(PAYLOAD_WORDS), min_size=1, max_size=5),
    env=st.dictionaries(
        st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True), ARG_TEXT, max_size=2
    ),
    sudo=st.booleans(),
)
def test_any_argv_reaches_bash_as_the_same_words(
    tmp_path: Path, sandbox: Path, argv: list[str], env: dict[str, str], sudo: bool
) -> None:
    host = RecordingHost(tmp_path)
    host.run(["printf", *argv], sudo=sudo, env=env)
    assert_sent_exactly_as_asked(host, sandbox)


def test_hostile_state_dir_on_a_real_file_system(tmp_path: Path, sandbox: Path) -> None:
    """The same code paths against this machine's file system through bash: the files land at
    the literal hostile path and no payload runs."""
    state = tmp_path / HOSTILE_SEGMENT / PAYLOAD_WORDS[1]
    executor = LocalExecutor(cwd=str(sandbox))
    lock = HostLock(executor, str(state), command=PAYLOAD_WORDS[0])
    lock.acquire()
    assert (state / "lock" / "info.json").is_file()
    audit_append(executor, str(state), AuditEntry(command=PAYLOAD_WORDS[2], outcome="ok"))
    assert [e["command"] for e in audit_tail(executor, str(state))] == [PAYLOAD_WORDS[2]]
    env_file = state / "svc;touch canary-env.env"
    env_file.write_text("K=v\n")
    store = Releases(executor, str(state))
    for model in PAYLOAD_WORDS[3:6]:
        store.record(
            Release(model, "r1", f"/opt/{model}", 8001, "none", "x.service", "u"),
            env_source=str(env_file),
            keep=2,
        )
    assert (
        store.numbers() == [2, 3] and (store.current() or release_none()).model == PAYLOAD_WORDS[5]
    )
    assert lock.release() is True
    assert not (state / "lock").exists()
    for call in executor.calls:
        prefix = ["sudo", "-n", "--"] if call.command.startswith("sudo ") else []
        assert shlex.split(call.command) == [*prefix, *call.argv]
    assert sorted(p.name for p in tmp_path.rglob("canary*")) == []


def release_none() -> Release:
    raise AssertionError("no current release")
