#!/usr/bin/env bash
# The whole test suite (unit, integration on real processes, fault matrix). Benchmarks live in
# tests/bench/ and are run by hand: python tests/bench/<name>.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider tests "$@"
