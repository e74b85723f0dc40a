#!/usr/bin/env bash
# Set up this machine (idempotent) and run the test suite: unit, integration (real vLLM
# engines, Ray, gRPC on loopback) and gpu (skipped without CUDA). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFT_HOME="${PREFT_HOME:-$(mktemp -d)}"
exec .venv/bin/python -m pytest -q -ra -p no:cacheprovider "$@"
