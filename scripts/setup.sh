#!/usr/bin/env bash
# Install what hpt and its tests need on a fresh Debian 12 machine with Python >= 3.11.
# Idempotent: skips what is already there. torch goes first (the CPU wheel) so nothing pulls a
# CUDA build later.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
ldconfig -p 2>/dev/null | grep -q 'libisal\.so\.2' || need_apt+=(libisal2)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# the Debian prometheus package starts a server we do not need
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: pip install torch (CPU)"
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
fi
# (re)install when a dependency is missing or hpt resolves to another checkout
here=$(pwd -P)
where=$("$PY" - <<'PYEOF' 2>/dev/null || true
import os
import grpc_tools, pytest_timeout, redis, rich, prometheus_client, click  # noqa: F401
import hpt.controller
print(os.path.realpath(os.path.dirname(os.path.dirname(hpt.controller.__file__))))
PYEOF
)
if [ "$where" != "$here" ]; then
  echo "setup: pip install -e .[dev]"
  "$PY" -m pip install -q -e ".[dev]"
fi
