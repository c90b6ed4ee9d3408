"""Fixtures shared by every test. The sandbox host and S3 fixtures live in tests/sandbox.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.sandbox"]

_LEAKY_ENV_PREFIXES = ("AWS_", "MODEL_DEPLOYER_")


@pytest.fixture(scope="session")
def _empty_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch, _empty_home: Path) -> None:
    """No AWS_* or MODEL_DEPLOYER_* from the developer's shell, and an empty HOME, so that
    the machine's ~/.ssh/config and ~/.aws never reach a test."""
    for name in list(os.environ):
        if name.startswith(_LEAKY_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(_empty_home))
