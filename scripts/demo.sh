#!/usr/bin/env bash
# `make demo`: boot the sandbox GPU host and S3, build and upload the demo model, show the plan,
# deploy it, and show it answering. Safe to re-run: a second deploy is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "sandbox host and S3 endpoint"
scripts/sandbox/up
# shellcheck source=/dev/null
source .sandbox/env

say "demo model (tiny Qwen2-shaped LM, random weights) -> s3://asoba-llm-cache/models/demo-tiny/"
scripts/sandbox/seed-demo-model

say "plan: deploy-model demo-tiny --dry-run"
.venv/bin/deploy-model demo-tiny --dry-run

say "apply: deploy-model demo-tiny"
.venv/bin/deploy-model demo-tiny

say "status"
.venv/bin/model-deployer status

port=$(.venv/bin/model-deployer status --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["port"])')
base="http://$(awk -F'"' '/^address/ {print $2}' .sandbox/config.toml):$port"
say "GET $base/health"
curl -fsS "$base/health"; echo
say "POST $base/v1/chat/completions"
curl -fsS "$base/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "demo-tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}'
echo
say "done: the demo model is serving on $base (random weights, so the words are noise)"
echo "stop the sandbox with: make sandbox-down"
