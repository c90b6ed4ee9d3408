"""Rendering the systemd unit, the service's env file and the discovery files."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer import unit
from deployer.config import Settings
from deployer.errors import ConfigError
from deployer.redact import REDACTED, Redactor, Secret, redact
from tests.local_executor import LocalExecutor

KEY = "sk-live-0123456789abcdefXYZ"


def settings(**remote: object) -> Settings:
    return Settings.model_validate(
        {
            "remote": {
                "service_dir": "/srv/asoba",
                "models_dir": "/data/models",
                "state_dir": "/var/lib/md",
                "service_user": "svc",
                **remote,
            },
            "service": {"memory_max": "16G", "cpu_quota": "400%", "restart_sec": 7},
        }
    )


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in unit.parse_unit(text)["Service"]:
        out.setdefault(key, []).append(value)
    return out


def one(text: str, key: str) -> str:
    (value,) = directives(text)[key]
    return value


def test_unit_carries_the_config() -> None:
    text = unit.render_unit(settings(), model_name="qwen3-14b", shutdown_timeout_s=25)
    assert not re.search(r"@[A-Z_]+@", text)
    d = directives(text)
    expected = {
        "User": "svc",
        "Group": "svc",
        "WorkingDirectory": "/srv/asoba",
        "EnvironmentFile": "/srv/asoba/service.env",
        "ExecStart": "/srv/asoba/venv/bin/python -m remote_service",
        "Restart": "always",
        "RestartSec": "7",
        "MemoryMax": "16G",
        "CPUQuota": "400%",
        "TimeoutStopSec": "35",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "no",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "ReadOnlyPaths": "/data/models",
        "InaccessiblePaths": "-/var/lib/md",
        "UMask": "0077",
        "LimitCORE": "0",
        "LimitNOFILE": "65536",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert any(v.startswith("char-nvidia-frontend") for v in d["DeviceAllow"])
    assert any(v.startswith("char-nvidia-uvm") for v in d["DeviceAllow"])
    assert "MemoryDenyWriteExecute" not in d  # torch JIT / Triton need W+X pages
    assert "MemoryDenyWriteExecute" in text  # ... and the template says so
    assert "HF_HUB_OFFLINE=1" in d["Environment"]
    assert unit.parse_unit(text)["Install"] == [("WantedBy", "multi-user.target")]
    assert "Description=Asoba inference service (qwen3-14b)" in text


def test_defaults_match_the_reference_service() -> None:
    text = unit.render_unit(Settings(), model_name="demo")
    # The reference ran as the SSH login user; ours has its own system account by default.
    assert one(text, "User") == one(text, "Group") == "asoba-inference"
    assert one(text, "WorkingDirectory") == "/opt/asoba-inference"
    assert one(text, "RestartSec") == "10"
    assert one(text, "MemoryMax") == "32G"
    assert one(text, "CPUQuota") == "800%"
    assert unit.unit_path(Settings()) == "/etc/systemd/system/asoba-inference.service"
    assert unit.env_file_path(Settings()) == "/opt/asoba-inference/service.env"


def test_home_trees_stay_readable_when_the_service_lives_there() -> None:
    text = unit.render_unit(settings(service_dir="/home/svc/asoba"), model_name="m")
    assert one(text, "ProtectHome") == "read-only"


def test_unsafe_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        unit.render_unit(settings(), model_name="x\nExecStartPre=/bin/sh")
    root = Settings.model_construct(
        remote=Settings().remote.model_copy(update={"service_user": "root"}),
        service=Settings().service,
    )
    with pytest.raises(ValueError, match="root"):
        unit.render_unit(root, model_name="m")
    with pytest.raises(KeyError):
        unit.render_unit(settings(), model_name="m", template="X=@NOPE@\n")


# -------------------------------------------------------------------------------- env file


def service_env(**kw: object) -> unit.ServiceEnv:
    return unit.service_env(
        settings(),
        model_dir="/data/models/qwen3-14b/r1",
        model_name="qwen3-14b",
        port=8001,
        quantization="4bit",
        dtype="bf16",
        api_key=Secret(KEY),
        **kw,
    )


def test_env_file_values_and_names() -> None:
    env = service_env()
    parsed = unit.parse_env_file(unit.render_env_file(env).reveal())
    assert parsed == {
        "ASOBA_MODEL_DIR": "/data/models/qwen3-14b/r1",
        "ASOBA_MODEL_NAME": "qwen3-14b",
        "ASOBA_HOST": "0.0.0.0",
        "ASOBA_PORT": "8001",
        "ASOBA_QUANTIZATION": "bnb-4bit",
        "ASOBA_DTYPE": "bfloat16",
        "ASOBA_MAX_NUM_SEQS": "8",
        "ASOBA_MAX_NEW_TOKENS": "1024",
        "ASOBA_SHUTDOWN_TIMEOUT": "20",
        "ASOBA_API_KEY": KEY,
    }


def test_env_names_are_the_servers() -> None:
    server = pytest.importorskip("remote_service.settings")
    names = set(server.Settings.env_names())
    assert set(unit.SERVER_ENV.values()) <= names
    # The server reads the rendered file as its settings.
    parsed = unit.parse_env_file(unit.render_env_file(service_env()).reveal())
    settings_ = server.Settings.from_env(parsed)
    assert settings_.port == 8001 and settings_.quantization == "bnb-4bit"
    assert settings_.api_key.get_secret_value() == KEY


@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\x7f"),
        max_size=60,
    )
)
def test_env_quoting_round_trips(value: str) -> None:
    text = unit.render_env_lines({"ASOBA_X": value, "ASOBA_Y": "plain"}).reveal()
    parsed = unit.parse_env_file(text)
    assert parsed["ASOBA_X"] == value
    assert parsed["ASOBA_Y"] == "plain"


def test_env_quoting_matches_bash() -> None:
    """The same quoting read by a shell gives the same value (systemd uses shell rules)."""
    values = ["a b", 'q"uote', "s'ingle", "dollar $HOME", "back\\slash", "tick `x`", "", "x=y"]
    text = unit.render_env_lines({f"V{i}": v for i, v in enumerate(values)}).reveal()
    script = text + "\n" + "".join(f'printf "%s\\0" "$V{i}"\n' for i in range(len(values)))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split("\0")[:-1] == values


def test_env_values_with_newlines_are_refused() -> None:
    with pytest.raises(ValueError):
        unit.quote_env_value("a\nb")
    with pytest.raises(ConfigError, match="unknown quantization"):
        unit.ServiceEnv(model_dir="/m", model_name="m", port=1, quantization="3bit")


# --------------------------------------------------------------------------------- secrets


def test_secret_never_prints() -> None:
    secret = Secret(KEY)
    assert KEY not in repr(secret) and KEY not in str(secret) and KEY not in f"{secret}"
    assert KEY not in f"{secret!r}" and REDACTED in str(secret)
    assert secret.reveal() == KEY and secret == Secret(KEY)
    env = service_env()
    assert KEY not in repr(env) and KEY not in str(env.variables())
    rendered = unit.render_env_file(env)
    assert isinstance(rendered, Secret) and KEY not in repr(rendered)
    files = unit.unit_files(settings(), env)
    assert KEY not in repr(files)
    for write in files:
        assert all(KEY not in word for word in write.argv("tok"))


def test_redactor() -> None:
    record = {
        "plan": {"api_key": "abc123", "port": 8001, "note": f"key is {KEY}"},
        "aws": "AKIAABCDEFGHIJKLMNOP in a message",
        "header": "Authorization: Bearer abcdefghijkl",
        "items": [Secret("s3cr3t-value"), "mentions s3cr3t-value"],
        "empty_token": "",
    }
    out = redact(record, secrets=[Secret("s3cr3t-value")])
    text = str(out)
    for leaked in ("abc123", KEY, "AKIAABCDEFGHIJKLMNOP", "abcdefghijkl", "s3cr3t-value"):
        assert leaked not in text
    assert out["plan"]["port"] == 8001 and out["empty_token"] == ""
    assert Redactor()("nothing secret here") == "nothing secret here"


# ------------------------------------------------------------------------------- discovery


def test_discovery_files(tmp_path: Path) -> None:
    variables = unit.discovery_variables(8001)
    assert variables == {
        "MISTRAL_STATUS_URL": "http://localhost:8001/status",
        "MISTRAL_FALLBACK_IP": "127.0.0.1",
        "ASOBA_INFERENCE_PORT": "8001",
    }
    profile = tmp_path / "asoba.sh"
    profile.write_text(unit.render_profile(variables))
    out = subprocess.run(
        ["bash", "-c", f'. "{profile}"; echo "$MISTRAL_STATUS_URL $ASOBA_INFERENCE_PORT"'],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert out.stdout.strip() == "http://localhost:8001/status 8001"
    assert unit.parse_env_file(unit.render_environment_d(variables)) == variables
    paths = [w.path for w in unit.unit_files(settings(), service_env())]
    assert paths == [
        "/srv/asoba/service.env",
        "/etc/systemd/system/asoba-inference.service",
        "/etc/profile.d/asoba-inference.sh",
        "/etc/environment.d/90-asoba-inference.conf",
    ]


# ------------------------------------------------------------------------------ installing


def test_write_file_is_atomic_private_and_keeps_the_secret_off_argv(tmp_path: Path) -> None:
    import getpass

    user = getpass.getuser()
    executor = LocalExecutor()
    content = unit.render_env_file(service_env())
    target = tmp_path / "etc" / "service.env"
    write = unit.FileWrite(str(target), content, mode="0600", owner=user)
    unit.write_file(executor, write, token="t1")
    assert target.read_text() == content.reveal()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["service.env"]
    for call in executor.calls:
        assert call.sudo and all(KEY not in word for word in call.argv)
        assert KEY not in call.command
    assert [c.stdin for c in executor.calls if c.stdin] == [content.reveal()]
    # Rewriting replaces it whole.
    unit.write_file(executor, unit.FileWrite(str(target), "A=1\n", mode="0600", owner=user))
    assert target.read_text() == "A=1\n"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    service_dir = tmp_path / "svc"
    python = service_dir / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    (tmp_path / "models").mkdir()
    cfg = settings(service_dir=str(service_dir), models_dir=str(tmp_path / "models"))
    path = tmp_path / "asoba-inference.service"
    path.write_text(unit.render_unit(cfg, model_name="demo"))
    verify = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    if security.returncode != 0 and match is None:
        pytest.skip("this systemd-analyze cannot score unit files offline")
    assert match is not None and float(match.group(1)) <= 2.0, security.stdout


def test_the_service_may_bind_its_own_port_only() -> None:
    text = unit.render_unit(settings(), model_name="m", port=8001)
    assert one(text, "SocketBindAllow") == "tcp:8001"
    assert one(text, "SocketBindDeny") == "any"
    with pytest.raises(ValueError, match="port"):
        unit.render_unit(settings(), model_name="m", port=0)
