#!/bin/sh
# Bootstrap hook for the Mistral fine-tunes: runs on the GPU host before the service starts.
# Environment: MODEL_NAME, MODEL_DIR (the verified weights), SERVICE_DIR (the venv's parent).
set -eu
: "${MODEL_DIR:?MODEL_DIR is not set}"
for f in config.json tokenizer_config.json; do
    [ -f "$MODEL_DIR/$f" ] || { echo "bootstrap: $MODEL_DIR/$f is missing" >&2; exit 1; }
done
echo "bootstrap: ${MODEL_NAME:-model} files present in $MODEL_DIR"
