#!/usr/bin/env bash
# docs/status-page.png: the controller's status page of a real local cluster (2 nodes x 2 ranks)
# whose job had rank 1 SIGKILLed and recovered from memory, rendered by headless Chromium.
# It is the status page integration test, keeping the screenshot it takes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/status-page.png}"
HPT_STATUS_SCREENSHOT="$PWD/$OUT" timeout 600 .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/integration/test_status_page.py
echo "$OUT"
