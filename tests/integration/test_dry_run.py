"""``deploy-model NAME --dry-run`` end to end: the real CLI as a subprocess, the sandbox host
over SSH, the model metadata from the sandbox's S3. The host must be unchanged afterwards.

Only demo-tiny is a real checkpoint (built by scripts/make_demo_model.py); the other catalog
models go into S3 as metadata-only objects (config.json, index, safetensors headers with the
real models' shapes), except mistral_iac_generation, which is left out on purpose: its plan
must fall back to the catalog's figures and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.catalog import load_catalog
from tests import model_shapes as ms

REPO = Path(__file__).resolve().parents[2]
DEPLOY_MODEL = Path(sys.executable).with_name("deploy-model")
CATALOG = load_catalog()
NOT_UPLOADED = "mistral_iac_generation"
GB = 1_000_000_000

# Flux's GPU share (MiB of the double's 23028) -> expected (action, stop_flux, port, quant)
EXPECTED: dict[int, dict[str, tuple[str, bool, int, str]]] = {
    14000: {
        "mistral_policy_analysis": ("coexist", False, 8001, "none"),
        "mistral_iac_generation": ("coexist", False, 8001, "none"),
        "demo-tiny": ("coexist", False, 8001, "none"),
        "qwen3-14b": ("replace", True, 8000, "awq"),
        "qwen3-14b-awq": ("replace", True, 8000, "awq"),
        "qwen3-coder-30b": ("replace", True, 8000, "bnb-4bit"),
        "deepseek-r1-8b": ("replace", True, 8000, "none"),
    },
}
# Flux holding almost the whole GPU: even the small models must stop it.
EXPECTED[22600] = {
    name: (("replace", True, 8000, quant) if action == "coexist" else (action, stop, port, quant))
    for name, (action, stop, port, quant) in EXPECTED[14000].items()
}
# Flux holding little: nothing changes for the small ones, the big ones still stop it.
EXPECTED[2000] = EXPECTED[14000]


def build_demo(out: Path) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo_model.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def upload_dir(client: Any, bucket: str, prefix: str, directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=prefix + path.name, Body=path.read_bytes())


# --------------------------------------------------------------------------- without the host


def test_demo_model_estimate_matches_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate of the real demo checkpoint, read from (in-process moto) S3 by ranged GETs,
    matches the size of its safetensors files within 5%."""
    import boto3
    from moto import mock_aws

    from deployer.config import PolicyConfig, S3Config
    from deployer.estimate import estimate
    from deployer.s3 import S3MetadataReader, client_for

    demo = build_demo(tmp_path / "demo")
    files = sum(p.stat().st_size for p in demo.glob("*.safetensors"))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    spec = CATALOG.models["demo-tiny"]
    with mock_aws():
        client = boto3.client("s3", region_name="us-west-2")
        client.create_bucket(
            Bucket=CATALOG.bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
        )
        upload_dir(client, CATALOG.bucket, spec.s3_prefix, demo)
        meta = S3MetadataReader(client_for(S3Config()), CATALOG.bucket).read(spec)
    est = estimate(meta, spec, PolicyConfig())
    assert meta.source == "s3" and meta.notes == []
    assert est.stored_bytes == pytest.approx(files, rel=0.05)
    assert est.needs["none"].weights_bytes == pytest.approx(files, rel=0.05)  # stored as bf16
    assert meta.config is not None and meta.config.model_type == "qwen2"


# --------------------------------------------------------------------------- the sandbox


def cli(
    sandbox: Any, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY_MODEL), *args],
        env={**os.environ, **sandbox.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# What a dry run must not change: unit files, installs, state, the units' processes, locks.
SNAPSHOT = (
    "set -e; "
    "find /etc/systemd/system /opt /var/lib/model-deployer /etc/asoba-inference /run/lock /tmp "
    "-xdev -path /opt/wheels -prune -o -printf '%p %s %T@ %m %u\\n' 2>/dev/null | sort -S 256M; "
    "systemctl show --property=Id,ActiveState,SubState,MainPID,NRestarts,ExecMainStartTimestamp "
    "flux-api.service asoba-inference.service; "
    "systemctl list-units --all --plain --no-legend --full | awk '{print $1, $3, $4}' "
    "| grep -v '^session-' | sort"
)


@pytest.fixture
def clean_sandbox(fresh_sandbox: Any) -> Iterator[Any]:
    """The sandbox in its boot state, put back so after the test (Flux, the GPU double)."""
    yield fresh_sandbox
    fresh_sandbox.reset()


def host_snapshot(sandbox: Any) -> str:
    return sandbox.sudo(SNAPSHOT).stdout


@pytest.fixture(scope="module")
def models_in_s3(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """The catalog in the sandbox's S3: demo-tiny for real, the rest as metadata only.
    Returns the demo's safetensors bytes."""
    client = sandbox.s3_client()
    demo = build_demo(tmp_path_factory.mktemp("demo") / "demo-tiny")
    upload_dir(client, sandbox.bucket, CATALOG.models["demo-tiny"].s3_prefix, demo)
    for name in ms.MODELS:
        spec = CATALOG.models[name]
        existing = client.list_objects_v2(Bucket=sandbox.bucket, Prefix=spec.s3_prefix)
        for obj in existing.get("Contents", []):
            client.delete_object(Bucket=sandbox.bucket, Key=obj["Key"])
        if name != NOT_UPLOADED:
            ms.upload(client, sandbox.bucket, spec.s3_prefix, name)
    return {"demo-tiny": sum(p.stat().st_size for p in demo.glob("*.safetensors"))}


def plan_json(sandbox: Any, name: str, *extra: str) -> dict[str, Any]:
    result = cli(sandbox, name, "--dry-run", "--json", *extra)
    assert result.returncode in (0, 4), result.stderr
    assert "Traceback" not in result.stderr
    return dict(json.loads(result.stdout))


def assert_host_short(plan: dict[str, Any]) -> None:
    """A refusal is acceptable only when this machine's RAM or disk is really too small."""
    verdicts = " ".join(o["verdict"] for o in plan["options"])
    assert "RAM" in verdicts or "disk" in verdicts, plan["reasons"]
    assert "GPU" not in verdicts.split("with Flux stopped (")[-1].split(")")[0], plan["reasons"]


@pytest.mark.sandbox
@pytest.mark.parametrize("flux_mib", sorted(EXPECTED))
def test_every_catalog_model_gets_the_expected_plan(
    clean_sandbox: Any, models_in_s3: dict[str, int], flux_mib: int
) -> None:
    sandbox = clean_sandbox
    sandbox.set_flux_gpu_mib(flux_mib)
    before = host_snapshot(sandbox)
    secret = _aws_secret(sandbox)
    for name, (action, stop_flux, port, quant) in EXPECTED[flux_mib].items():
        plan = plan_json(sandbox, name)
        assert plan["model"] == name
        assert plan["facts"]["flux_state"] == "active"
        assert plan["facts"]["flux_gpu_mib"] == flux_mib
        assert plan["facts"]["gpu_total_mib"] == 23028
        if plan["action"] == "refuse" and action != "refuse":
            assert_host_short(plan)
            continue
        got = (plan["action"], plan["stop_flux"], plan["port"], plan["quantization"])
        assert got == (action, stop_flux, port, quant), (name, plan["reasons"])
        assert plan["need_gb"] * GB <= plan["headroom"]["gpu_bytes"] + 0.01 * GB
        source = plan["estimate"]["source"]
        if name == NOT_UPLOADED:
            assert source == "catalog"
            assert any("catalog's figures" in w for w in plan["warnings"])
        else:
            assert source == "s3", plan["warnings"]
        assert secret not in json.dumps(plan)
    assert host_snapshot(sandbox) == before


@pytest.mark.sandbox
def test_rich_dry_run_and_host_unchanged(clean_sandbox: Any, models_in_s3: dict[str, int]) -> None:
    before = host_snapshot(clean_sandbox)
    result = cli(clean_sandbox, "qwen3-14b", "--dry-run", env={"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    for text in (
        "REPLACE",
        "will be STOPPED",
        "qwen3-14b-awq",
        "Steps apply would run",
        "stop-flux",
        "http://10.77.0.2:8000/v1/chat/completions",
        "dry run: nothing was changed on the host",
    ):
        assert text in result.stdout, text
    assert host_snapshot(clean_sandbox) == before


@pytest.mark.sandbox
def test_demo_plan_reads_its_real_size(clean_sandbox: Any, models_in_s3: dict[str, int]) -> None:
    plan = plan_json(clean_sandbox, "demo-tiny")
    weights = plan["estimate"]["weights_bytes"]
    assert weights == pytest.approx(models_in_s3["demo-tiny"], rel=0.05)
    assert plan["needs"]["disk_bytes"] >= models_in_s3["demo-tiny"]


@pytest.mark.sandbox
def test_plan_still_holds_against_a_fresh_probe(
    clean_sandbox: Any, models_in_s3: dict[str, int]
) -> None:
    from deployer.config import load_settings
    from deployer.planner import Plan
    from deployer.probe import inspect_host
    from deployer.ssh import SSHHost

    plan = Plan.model_validate(plan_json(clean_sandbox, "deepseek-r1-8b"))
    settings = load_settings(clean_sandbox.config_path)
    with SSHHost(settings.host) as host:
        assert plan.still_holds(inspect_host(host, settings.remote)) == []
        # another process takes 9000 MiB of the GPU: the plan's need no longer fits once Flux
        # stops (vLLM's claim, 22.9 GB; the transformers engine's would be 19.5 GB)
        clean_sandbox.update_gpu_state(
            processes=[{"pid": 4242, "name": "python3", "used_mib": 9000}]
        )
        moved = plan.still_holds(inspect_host(host, settings.remote))
    assert plan.engine == "vllm"
    assert moved and moved[0].startswith(f"GPU: needs {plan.need_gb:.1f} GB, headroom now")


@pytest.mark.sandbox
def test_probe_on_stdin_is_fast_over_ssh(sandbox: Any) -> None:
    """One connection, one command, the script on stdin: well under a second on the sandbox."""
    import time

    from deployer.config import load_settings
    from deployer.probe import inspect_host
    from deployer.ssh import SSHHost

    settings = load_settings(sandbox.config_path)
    with SSHHost(settings.host) as host:
        host.open()
        started = time.perf_counter()
        facts = inspect_host(host, settings.remote)
        elapsed = time.perf_counter() - started
        big = host.run(["wc", "-c"], stdin="x" * 2_000_000, timeout=30)
    assert elapsed < 3, elapsed
    assert big.stdout.strip() == "2000000"
    assert facts.gpu.source == "nvidia-smi" and facts.gpu.devices[0].name == "NVIDIA A10G"
    assert facts.flux.active and facts.flux.main_pid in facts.flux.pids
    assert facts.gpu.devices[0].used_by_pids(facts.flux.pid_set) == 14000 * 1024 * 1024
    assert 8000 in facts.listening_ports and facts.errors == []


@pytest.mark.sandbox
def test_flux_stopped_by_hand_big_model_takes_8000_without_stopping(
    clean_sandbox: Any, models_in_s3: dict[str, int]
) -> None:
    clean_sandbox.sudo("systemctl stop flux-api.service")
    plan = plan_json(clean_sandbox, "deepseek-r1-8b")
    assert (plan["action"], plan["stop_flux"], plan["port"]) == ("replace", False, 8000)
    assert plan["facts"]["flux_state"] == "inactive"


@pytest.mark.sandbox
def test_unknown_model_exits_2_with_a_suggestion(sandbox: Any) -> None:
    result = cli(sandbox, "qwen3-coder", "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown model 'qwen3-coder' (did you mean 'qwen3-coder-30b'")
    assert lines[0].endswith("(`deploy-model --list` shows the catalog)")


@pytest.mark.sandbox
def test_wrong_key_exits_3_with_one_line(sandbox: Any, tmp_path: Path) -> None:
    key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "wrong.toml"
    text = sandbox.config_path.read_text()
    config.write_text(text.replace(str(sandbox.key_file), str(key)))
    assert str(key) in config.read_text()
    result = cli(sandbox, "demo-tiny", "--dry-run", "--config", str(config))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: SSH authentication failed for ubuntu@10.77.0.2:22")
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.sandbox
def test_unreachable_host_exits_3(sandbox: Any, tmp_path: Path) -> None:
    config = tmp_path / "nohost.toml"
    config.write_text(
        sandbox.config_path.read_text()
        .replace('address = "10.77.0.2"', 'address = "10.77.0.254"')
        .replace("[host]", "[host]\nconnect_timeout = 2")
    )
    result = cli(sandbox, "demo-tiny", "--dry-run", "--config", str(config))
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot reach ubuntu@10.77.0.254:22")
    assert len(result.stderr.strip().splitlines()) == 1


def _aws_secret(sandbox: Any) -> str:
    text = Path(sandbox.env["AWS_SHARED_CREDENTIALS_FILE"]).read_text()
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "aws_secret_access_key":
            return value.strip()
    raise AssertionError("no secret in the sandbox's credentials file")
