"""Pre-flight checks (``validate-components``): does the whole chain work, before any deploy?

Each check answers ``pass``, ``warn`` or ``fail`` with the value it measured and, when not
``pass``, a one-line remedy. Checks are grouped; ``--only`` picks groups::

    config     the config file, the SSH key file (exists, mode 0600-ish), the catalog
    ssh        reachable, host key known and matching, key auth, connect and round-trip time
    sudo       passwordless sudo: runs `sudo -n true`, `sudo -n systemctl --version`,
               `sudo -n install --version`, and asks `sudo -n -l` about the rest
    resources  RAM, disk under remote.models_dir, GPUs, the Flux and inference units
    systemd    unit state readable, daemon-reload permitted (sudo -l, never run), journal
    python     the host's python3: version, venv + ensurepip, room for a venv; torch and CUDA
    s3         operator credentials, bucket, every selected model's prefix; the host's own
               credentials and whether S3 answers from the host (the host does the pull)
    health     when deployed: /health and /status answer in the monitor's format (loopback)

Every check is read-only and independent: one failing does not hide the others. A check that
cannot run because what it stands on failed (no config, no SSH session) is reported as a
``fail`` saying so. All host checks share one SSH connection and two remote commands: ``true``
(the round trip) and ``deployer/remote/validate_host.py``, which runs the host probe and every
host-side command at once.

Missing model prefixes are a warning when the whole catalog is checked (a catalog can name
models not uploaded yet) and a failure when the operator named the models (``--models``);
``--strict`` turns every warning into exit status 1.

Modules, one per stage: ``report`` (rows, the report, options), ``config_checks``,
``host_spec`` (the one host command and its answer), ``host_checks`` (ssh, sudo, systemd,
python, and running the host's side), ``resource_checks``, ``s3_checks``, ``health_shape``
(the monitor's format) and ``run`` (``run_checks``).
"""

from __future__ import annotations

from .config_checks import check_key_file
from .health_shape import check_shape, health_problems, status_problems
from .host_checks import HostFactory, check_torch
from .host_spec import host_script, host_spec, sudo_commands
from .report import (
    GROUPS,
    ROWS,
    CheckResult,
    Options,
    Report,
    Status,
    fail,
    not_checked,
    ok,
    parse_list,
    parse_only,
    warn,
)
from .run import default_host_factory, run_checks
from .s3_checks import S3Factory

__all__ = [
    "GROUPS",
    "ROWS",
    "CheckResult",
    "HostFactory",
    "Options",
    "Report",
    "S3Factory",
    "Status",
    "check_key_file",
    "check_shape",
    "check_torch",
    "default_host_factory",
    "fail",
    "health_problems",
    "host_script",
    "host_spec",
    "not_checked",
    "ok",
    "parse_list",
    "parse_only",
    "run_checks",
    "status_problems",
    "sudo_commands",
    "warn",
]
