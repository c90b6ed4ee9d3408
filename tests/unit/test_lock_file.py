"""The lock (deployer/locks/): in step with pyproject.toml, its two views agreeing, and the
check that `make lint` runs failing with one line when a dependency changes without a relock."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "deployer" / "locks"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def pins(view: str) -> dict[str, str]:
    return {canonicalize_name(n): v for n, v in PIN.findall((LOCKS / view).read_text())}


def lock_settings() -> dict:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["model-deployer"]["lock"]


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The files the check reads, copied: pyproject.toml, the lock and the script."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "lock.py", tmp_path / "scripts" / "lock.py")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(LOCKS, tmp_path / "deployer" / "locks")
    return tmp_path


def test_committed_lock_matches_pyproject() -> None:
    result = run_check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_changed_dependency_without_relock_fails_with_one_line(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    text = pyproject.read_text()
    assert '"click>=8.1,<9",' in text
    pyproject.write_text(text.replace('"click>=8.1,<9",', '"click>=8.1,<8.4",'))
    result = run_check(checkout)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "make lock" in lines[0], result.stdout


def test_a_new_extra_package_also_needs_a_relock(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pytest>=8,<10",', '"pytest>=8,<10", "x",'))
    assert run_check(checkout).returncode == 1


def test_missing_lock_is_reported(checkout: Path) -> None:
    (checkout / "deployer" / "locks" / "server.txt").unlink()
    result = run_check(checkout)
    assert result.returncode == 1 and "server.txt" in result.stdout


def test_every_pin_is_exact_and_hashed() -> None:
    for view in ("dev.txt", "server.txt"):
        text = (LOCKS / view).read_text()
        entries = re.findall(r"^(\S.*?) \\\n((?:    --hash=sha256:[0-9a-f]{64}.*\n)+)", text, re.M)
        requirement_lines = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
        assert len(entries) == len(requirement_lines) > 40, view
        assert all("==" in line for line in requirement_lines), view


def test_server_view_is_the_dev_resolution_without_what_the_host_provides() -> None:
    dev, server = pins("dev.txt"), pins("server.txt")
    assert {name: dev.get(name) for name in server} == server  # same versions
    provided = {canonicalize_name(n) for n in lock_settings()["host-provided"]}
    assert not provided & set(server)
    # What only torch needs stays out too; what the server needs itself stays in.
    assert "sympy" in dev and "sympy" not in server
    for needed in ("transformers", "fastapi", "uvicorn", "safetensors", "boto3", "click"):
        assert needed in server
    # Dev tools are not shipped to the host.
    for tool in ("pytest", "ruff", "moto", "uv"):
        assert tool in dev and tool not in server


def test_dev_view_pins_the_cpu_torch() -> None:
    dev = pins("dev.txt")
    (pin,) = [p for p in lock_settings()["dev-pins"] if p.startswith("torch==")]
    assert dev["torch"] == pin.split("==", 1)[1] and dev["torch"].endswith("+cpu")


def test_installed_environment_is_the_lock() -> None:
    """The venv running these tests was installed from dev.txt (scripts/install-dev.sh)."""
    from importlib.metadata import distributions

    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    dev = pins("dev.txt")
    assert {name: installed.get(name) for name in dev} == dev


def test_upper_bounds_on_what_breaks_us() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    server = pyproject["project"]["optional-dependencies"]["server"]
    (transformers,) = [r for r in server if r.startswith("transformers")]
    assert "<5.40" in transformers  # 5.40 removes past_key_values; our floor is its successor
    for requirement in [*pyproject["project"]["dependencies"], *server]:
        assert "<" in requirement, f"no upper bound: {requirement}"


def test_a_different_lock_is_a_different_venv(tmp_path: Path) -> None:
    """The venv is named by code_id, which covers the lock: a new lock builds a new venv, the
    same code and lock name the same one (so a re-deploy reuses it)."""
    from deployer.service_code import code_id, lock_hash

    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in ("deployer", "remote_service"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    lock = tmp_path / "deployer" / "locks" / "server.txt"
    before, before_lock = code_id(tmp_path), lock_hash(lock)
    assert code_id(tmp_path) == before and before == code_id(ROOT)
    lock.write_text(lock.read_text().replace("click==", "click==0.0.0+x", 1))
    assert code_id(tmp_path) != before
    assert lock_hash(lock) != before_lock


def test_a_dev_tool_change_leaves_the_server_view_alone(checkout: Path) -> None:
    """The hosts' lock (and so their venvs) moves only when what the server needs moves."""
    sys.path.insert(0, str(checkout / "scripts"))
    try:
        import lock as lock_script  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    pyproject = tomllib.loads((checkout / "pyproject.toml").read_text())
    server_before = lock_script.input_hash(pyproject, "server.txt")
    dev_before = lock_script.input_hash(pyproject, "dev.txt")
    pyproject["project"]["optional-dependencies"]["dev"].append("x")
    assert lock_script.input_hash(pyproject, "server.txt") == server_before
    assert lock_script.input_hash(pyproject, "dev.txt") != dev_before
    pyproject["project"]["optional-dependencies"]["server"].append("y")
    assert lock_script.input_hash(pyproject, "server.txt") != server_before
