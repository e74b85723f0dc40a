#!/usr/bin/env bash
# Regenerate the Python modules of proto/preft/v1/*.proto (run from anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-.}
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
  proto/preft/v1/router.proto
