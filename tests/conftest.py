"""Fixtures shared by every test. The sandbox host and S3 fixtures live in tests/sandbox.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployer import config

pytest_plugins = ["tests.sandbox"]

_LEAKY_ENV_PREFIXES = ("AWS_", "MODEL_DEPLOYER_")

#: What ``load_settings`` looks for in the working directory when no path is given.
USER_DEFAULT_FILE = config.DEFAULT_FILE


@pytest.fixture(scope="session")
def _empty_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def _no_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-config") / USER_DEFAULT_FILE.name


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch, _empty_home: Path, _no_config_file: Path) -> None:
    """No AWS_* or MODEL_DEPLOYER_* from the developer's shell, and an empty HOME, so that
    the machine's ~/.ssh/config and ~/.aws never reach a test.

    Nor the ``./model-deployer.toml`` the README has operators keep at the repository root:
    discovery in the working directory looks at a path that never exists, so a test sees a
    config file only when it passes one (a path, ``MODEL_DEPLOYER_CONFIG``) or asks for
    discovery itself (``user_config_discovery``). Subprocesses are not patched: the CLI runs
    of the fast tier pass their own ``cwd``, those of the sandbox tier ``MODEL_DEPLOYER_CONFIG``.
    """
    for name in list(os.environ):
        if name.startswith(_LEAKY_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(_empty_home))
    # Discovery's one input that is not an argument or the environment: the cwd's file.
    monkeypatch.setattr(config, "DEFAULT_FILE", _no_config_file)


@pytest.fixture
def user_config_discovery(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Discovery as operators have it (``./model-deployer.toml``), for the tests of it."""
    # Undo hermetic_env's patch above for this test only.
    monkeypatch.setattr(config, "DEFAULT_FILE", USER_DEFAULT_FILE)
    return USER_DEFAULT_FILE
