#!/usr/bin/env bash
# The whole test suite (unit, integration on real processes, fault matrix) in the checkout's
# virtualenv. Benchmarks live in tests/bench/ and are run by hand: .venv/bin/python tests/bench/<name>.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
if [ "$#" -gt 0 ] || [ "${HPT_TEST_SERIAL:-0}" = 1 ]; then
  exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
fi
# The whole suite as two pytest processes side by side: the tests that start local clusters
# (agents named node-0, node-1 ... on one /dev/shm and loopback) one after another, and beside
# them the unit tests, then the control-plane fault tests and the chaos run (clusters of their
# own that tell their agents' files and locks apart from another cluster's by owner pid) and the
# TCP proxy's tests.
# The second process's report is printed after the first one's.
SIDE=(tests/faults/test_control_plane.py tests/faults/test_proxy.py tests/faults/test_chaos.py)
UNIT_LOG=$(mktemp)
trap 'rm -f "$UNIT_LOG"' EXIT
"$PY" -m pytest -q -p no:cacheprovider --durations=10 tests/unit "${SIDE[@]}" > "$UNIT_LOG" 2>&1 &
UNIT_PID=$!
CLUSTER_RC=0
"$PY" -m pytest -q -p no:cacheprovider --durations=15 tests/integration tests/faults \
  "${SIDE[@]/#/--ignore=}" || CLUSTER_RC=$?
UNIT_RC=0
wait "$UNIT_PID" || UNIT_RC=$?
echo "---- tests/unit, ${SIDE[*]}"
cat "$UNIT_LOG"
echo "---- cluster tests exit ${CLUSTER_RC}, unit and side tests exit ${UNIT_RC}"
[ "$CLUSTER_RC" -eq 0 ] && [ "$UNIT_RC" -eq 0 ]
