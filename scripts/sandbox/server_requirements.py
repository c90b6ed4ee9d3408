#!/usr/bin/env python3
"""Print the requirements the sandbox guest's wheelhouse must hold, one per line.

Derived from pyproject.toml, so there is no second list to keep in step: the `server` extra
without torch (the host's own build is reused through --system-site-packages), the project's
base dependencies (installing the project's wheel on the host resolves them), and the
packaging tools a venv needs to install from wheels offline.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

HOST_PROVIDED = {"torch"}
PACKAGING = ["pip", "setuptools", "wheel"]


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise SystemExit(f"cannot parse requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = [*project.get("dependencies", []), *project["optional-dependencies"]["server"]]
    kept = [r for r in wanted if _name(r) not in HOST_PROVIDED]
    return sorted(set(kept + PACKAGING), key=str.lower)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2]
    print("\n".join(requirements(root / "pyproject.toml")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
