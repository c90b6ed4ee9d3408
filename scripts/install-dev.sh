#!/usr/bin/env bash
# Create the project's virtualenv (.venv) with exactly the lock (deployer/locks/dev.txt): the
# CLI, the server, the dev tools and the CPU build of PyTorch, every file checked against its
# sha256; then this checkout, editable and without dependencies.
#
# Idempotent: a venv made from the same lock is left as it is. A different lock gets a new
# venv, so nothing of the old one lingers. The CPU torch wheel comes from pip's configured
# find-links or index (on a machine without one: PIP_EXTRA_INDEX_URL=<PyTorch's CPU index>).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# Never the venv's own python (the Makefile puts it first on PATH, and it is about to go).
PATH="${PATH//"$PWD/$VENV/bin:"/}"
PYTHON=${PYTHON:-python3}
LOCK=${LOCK:-deployer/locks/dev.txt}
stamp="$VENV/.installed"
want="$(sha256sum "$LOCK" scripts/install-dev.sh | sha256sum | cut -c1-64)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
"$PYTHON" scripts/lock.py --check
rm -rf -- "$VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --require-hashes --no-deps -r "$LOCK"
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
"${pip[@]}" check
printf '%s\n' "$want" >"$stamp"
echo "installed: $VENV (from $LOCK)"
