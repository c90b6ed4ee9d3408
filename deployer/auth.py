"""Whether the deployed service asks for an API key, and which: decided before the plan is shown.

The key the host already has is kept unless the operator says otherwise explicitly:

- ``MODEL_DEPLOYER_API_KEY`` set on the operator's machine: that key (a new or rotated one);
- else ``--no-auth``: no key; when the host has one this opens generation to the network,
  so it also needs ``--yes``;
- else the key in the host's env file, read back with sudo and written again unchanged;
- else no key anywhere: auth stays off, as it was.

A re-deploy by an operator without the variable therefore neither drops the key nor changes
the env file (and stays a no-op). The key itself is never shown: only ``auth: on/off`` and
where the key comes from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .config import Settings
from .errors import DeployError
from .ssh import Executor
from .unit import env_file_path, parse_env_file

API_KEY_ENV = "MODEL_DEPLOYER_API_KEY"
_ENV_NAME = "ASOBA_API_KEY"

Source = Literal["operator", "host", "none", "removed"]


class AuthOffRefused(DeployError):
    exit_code = 2


@dataclass(frozen=True)
class Auth:
    source: Source
    key: str | None = field(default=None, repr=False)

    @property
    def on(self) -> bool:
        return self.key is not None

    def describe(self) -> str:
        return {
            "operator": "on (the key in MODEL_DEPLOYER_API_KEY)",
            "host": "on (the host's key, kept)",
            "none": "off (no key on the host or in MODEL_DEPLOYER_API_KEY)",
            "removed": "off (--no-auth: the host's key is removed)",
        }[self.source]


def host_api_key(executor: Executor, settings: Settings) -> str | None:
    """The key in the host's service env file, if there is one (read with sudo: it is 0600)."""
    result = executor.run(["cat", "--", env_file_path(settings)], sudo=True, check=False)
    if not result.ok:
        return None
    return parse_env_file(result.stdout).get(_ENV_NAME) or None


def decide(
    executor: Executor,
    settings: Settings,
    *,
    no_auth: bool = False,
    yes: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Auth:
    env = os.environ if environ is None else environ
    given = env.get(API_KEY_ENV) or None
    if given is not None:
        if no_auth:
            raise AuthOffRefused(f"--no-auth and {API_KEY_ENV} contradict each other")
        return Auth("operator", given)
    existing = host_api_key(executor, settings)
    if no_auth:
        if existing is not None and not yes:
            raise AuthOffRefused(
                "--no-auth removes the host's API key and opens generation to the network",
                hint="add --yes to do that, or drop --no-auth to keep the key",
            )
        return Auth("removed" if existing is not None else "none")
    if existing is not None:
        return Auth("host", existing)
    return Auth("none")
