#!/bin/sh
# Bootstrap hook for Qwen3 14B: runs on the GPU host before the service starts.
# Qwen3 needs a transformers release that knows the qwen3 architecture; check the venv has it
# so the failure is named here rather than as a crash loop of the unit.
# Environment: MODEL_NAME, MODEL_DIR, SERVICE_DIR.
set -eu
: "${MODEL_DIR:?MODEL_DIR is not set}"
: "${SERVICE_DIR:?SERVICE_DIR is not set}"
[ -f "$MODEL_DIR/config.json" ] || { echo "bootstrap: $MODEL_DIR/config.json is missing" >&2; exit 1; }
"$SERVICE_DIR/venv/bin/python" - "$MODEL_DIR/config.json" <<'PY'
import json, sys
from transformers import AutoConfig
arch = json.load(open(sys.argv[1])).get("model_type", "?")
AutoConfig.from_pretrained(sys.argv[1].rsplit("/", 1)[0])
print(f"bootstrap: transformers understands model_type {arch!r}")
PY
