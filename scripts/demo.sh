#!/usr/bin/env bash
# Set up this machine (idempotent) and run the main job: a local PreFT cluster on the
# embedded default (tiny model + demo adapters made locally, local Ray), a few requests
# through the client, outputs and KV bytes/seconds printed. Extra args go to `preft demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/preft demo "$@"
