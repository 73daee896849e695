#!/usr/bin/env bash
# The main job: a local cluster (controller + 2 agents, embedded store), the demo training job as
# 2 nodes x 2 ranks, one rank killed midway, recovery, and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m hpt.cli demo "$@"
