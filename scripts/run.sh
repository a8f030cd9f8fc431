#!/usr/bin/env bash
# The main job: installs and builds what is missing, then runs `kvpool local` (a storage node on
# loopback with the embedded default settings, and a demo workload that shows prefix reuse).
# Extra arguments go to `kvpool local` (e.g. --serve to keep the node running).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvpool local "$@"
