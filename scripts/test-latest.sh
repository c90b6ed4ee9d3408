#!/usr/bin/env bash
# Install the newest versions that pyproject.toml's ranges allow into a throwaway venv and run
# the fast tier (unit and server tests) there. Shows breakage coming before `make lock` takes
# it in. The venv is removed afterwards; `pip freeze` of it is printed first, as the record.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv="$(mktemp -d "${TMPDIR:-/tmp}/model-deployer-latest.XXXXXX")"
trap 'rm -rf -- "$venv"' EXIT
"$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# The CPU build of torch, as in the lock (the newest release allowed would be a CUDA build).
torch_pin="$("$PYTHON" -c 'import tomllib; print(*[p for p in tomllib.load(open("pyproject.toml", "rb"))["tool"]["model-deployer"]["lock"]["dev-pins"] if p.startswith("torch")])')"
printf '%s\n' "$torch_pin" >"$venv/constraints.txt"
"${pip[@]}" install -q --upgrade --upgrade-strategy eager -c "$venv/constraints.txt" -e '.[server,dev]'
"${pip[@]}" check
echo "== versions under test (newest allowed) =="
"${pip[@]}" freeze --exclude-editable | grep -iE '^(transformers|torch|fastapi|starlette|uvicorn|pydantic|accelerate|tokenizers|safetensors|boto3|fabric|paramiko|click|rich|moto|pytest)==' || true
"$venv/bin/python" -m pytest -m "not sandbox and not chaos" -q "$@"
