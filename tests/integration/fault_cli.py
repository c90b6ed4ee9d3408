"""``deploy-model`` with a fault fired at a chosen point of the apply (a test harness).

    python tests/integration/fault_cli.py ARGS...      (the arguments of deploy-model)

Environment:
    FAULT_AT    ``<event>:<step>`` as the apply reports it, e.g. ``start:pull-weights`` (before
                the step's first remote command) or ``done:start`` (right after it)
    FAULT_CMD   a shell command run on this machine when that point is reached, e.g. one that
                kills the deploy's SSH session on the host; the deploy then goes on (or fails)
                exactly as the product does

The product has no fault switches: this wraps the console reporter from the outside, so the
command runs between two real steps of a real deploy.
"""

from __future__ import annotations

import os
import subprocess
import sys

from deployer import apply_view, cli

FAULT_AT = os.environ.pop("FAULT_AT")
FAULT_CMD = os.environ.pop("FAULT_CMD")
_step = apply_view.ConsoleReporter.step
_fired: list[bool] = []


def step(self: apply_view.ConsoleReporter, event: str, name: str) -> None:
    _step(self, event, name)
    if not _fired and f"{event}:{name}" == FAULT_AT:
        _fired.append(True)
        done = subprocess.run(FAULT_CMD, shell=True, capture_output=True, text=True, timeout=300)
        self.console.print(
            f"[fault] {FAULT_AT}: {FAULT_CMD!r} exited {done.returncode}", markup=False, emoji=False
        )


apply_view.ConsoleReporter.step = step  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "deploy-model"
    sys.exit(cli.main())
