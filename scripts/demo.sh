#!/usr/bin/env bash
# The main job: a local cluster (controller + 2 agents, embedded store), the demo training job as
# 2 nodes x 2 ranks, one rank killed midway, recovery, and a summary. Runs in the checkout's
# virtualenv (.venv), which scripts/setup.sh creates.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
exec "$PY" -m hpt.cli demo "$@"
