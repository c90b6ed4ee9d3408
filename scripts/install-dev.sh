#!/usr/bin/env bash
# Create the project's virtualenv (.venv) with the CLI, the server and the test tools.
# Idempotent: re-running with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.installed"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# PyTorch first, pinned: a local CPU wheel when the machine has one (no CUDA download).
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e '.[server,dev]'
touch "$stamp"
echo "installed: $VENV"
