"""What the deploy tests share: running the CLIs against the sandbox, the demo model in S3,
a pristine host per test, test catalog entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.sandbox import SandboxHost

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UNIT = "asoba-inference.service"
FLUX = "flux-api.service"
LOCK = "/var/lib/model-deployer/lock"


def run(
    sandbox: SandboxHost,
    tool: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / tool), *args],
        env={**os.environ, **sandbox.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def deploy(sandbox: SandboxHost, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run(sandbox, "deploy-model", *args, **kw)  # type: ignore[arg-type]


def ops(sandbox: SandboxHost, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run(sandbox, "model-deployer", *args, **kw)  # type: ignore[arg-type]


def last_json(text: str) -> dict:
    return json.loads(text[text.index("{") :])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo-tiny"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_demo_model.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def upload(sandbox: SandboxHost, directory: Path, prefix: str) -> None:
    s3 = sandbox.s3_client()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            s3.upload_file(str(path), sandbox.bucket, prefix + path.name)


KEPT_VENVS = "/var/tmp/model-deployer-test-venvs"


def reset_keeping_venvs(sandbox: SandboxHost) -> None:
    """Back to the boot state, except that service venvs built by earlier tests survive:
    building one takes half a minute and the first test of the module already covers it."""
    sandbox.sudo(f"rm -rf {KEPT_VENVS}; mv /opt/asoba-inference/venvs {KEPT_VENVS} || true")
    sandbox.reset()
    sandbox.sudo(
        f"if [ -d {KEPT_VENVS} ]; then install -d -m 0755 /opt/asoba-inference && "
        f"mv {KEPT_VENVS} /opt/asoba-inference/venvs; fi"
    )


@pytest.fixture
def host(sandbox: SandboxHost, demo_dir: Path) -> Iterator[SandboxHost]:
    """A pristine host (but for cached venvs) with the demo model in S3.

    The teardown keeps the venvs too: a full reset there would leave the next test nothing to
    keep, and every test would build the service venv again (about half a minute each)."""
    reset_keeping_venvs(sandbox)
    upload(sandbox, demo_dir, "models/demo-tiny/")
    yield sandbox
    reset_keeping_venvs(sandbox)


def extra_catalog(tmp_path: Path, **entries: dict) -> Path:
    """The repository's catalog plus test entries."""
    data = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    for entry in data["models"].values():
        entry.pop("bootstrap", None)  # their scripts live beside the repository's catalog
    base = {
        "tier": "raw",
        # The fault tests' stand-ins of the demo model run on the transformers engine, as the
        # demo does; tests/integration/test_vllm_engine.py asks for vLLM with --engine.
        "engine": "transformers",
        "precision": "fp32",
        "parameters_b": 0.001,
        "size_gb": 0.004,
        "context_length": 2048,
    }
    for name, entry in entries.items():
        data["models"][name] = {**base, "s3_prefix": f"models/{name}/", **entry}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def lock_left(sandbox: SandboxHost) -> bool:
    """Whether the host's deploy lock exists."""
    answer = sandbox.ssh(f"test -e {LOCK}; echo $?").stdout.strip()
    assert answer in {"0", "1"}, answer
    return answer == "0"


def status(sandbox: SandboxHost, port: int) -> dict:
    return httpx.get(sandbox.url(port, "/status"), timeout=10).json()


def upload_padded(sandbox: SandboxHost, demo_dir: Path, tmp_path: Path, padding_mib: int) -> Path:
    """The demo model plus ``padding_mib`` MiB of random bytes, in S3 as ``padded-tiny``;
    returns a catalog that lists it."""
    padded = tmp_path / "padded"
    padded.mkdir()
    for path in demo_dir.iterdir():
        (padded / path.name).write_bytes(path.read_bytes())
    (padded / "padding.bin").write_bytes(os.urandom(padding_mib * 1024 * 1024))
    upload(sandbox, padded, "models/padded-tiny/")
    return extra_catalog(tmp_path, **{"padded-tiny": {}})
