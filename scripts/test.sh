#!/usr/bin/env bash
# The whole test suite (unit, integration on real processes, fault matrix) in the checkout's
# virtualenv. Benchmarks live in tests/bench/ and are run by hand: .venv/bin/python tests/bench/<name>.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
# two workers (HPT_TEST_WORKERS): the cluster tests in order on one, unit tests on the other
WORKERS=${HPT_TEST_WORKERS:-2}
if [ "$WORKERS" -gt 1 ]; then
  exec "$PY" -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadgroup tests "$@"
fi
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
