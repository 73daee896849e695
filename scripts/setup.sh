#!/usr/bin/env bash
# Install what hpt and its tests need on a fresh Debian 12 machine with Python >= 3.11, into a
# virtualenv in the checkout (.venv): Debian's system Python refuses pip installs (PEP 668), and a
# fresh venv holds only what pyproject declares, so an undeclared import fails here first.
# Idempotent: skips what is already there. The dev extra includes the Lightning extra so that
# the integration's tests run in CI. torch goes first (the CPU wheel) so nothing pulls a
# CUDA build later. Prints the venv's python on its last line for the caller.
set -euo pipefail
cd "$(dirname "$0")/.."

have_lib() {
  # no pipe under pipefail: grep -q exits at the first match and ldconfig would get SIGPIPE
  local libs
  libs=$(ldconfig -p 2>/dev/null || true)
  [[ "$libs" == *"$1"* ]]
}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
have_lib 'libisal.so.2' || need_apt+=(libisal2)
# the status page test renders the page in headless Chromium
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
BASE_PY=${PYTHON:-python3}
"$BASE_PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# the Debian prometheus package starts a server we do not need
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

VENV=${HPT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: python -m venv $VENV" >&2
  "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: pip install torch (CPU)" >&2
  "$PY" -m pip install -q "torch==2.13.0" >&2 \
    || "$PY" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch >&2
fi
# (re)install when a declared dependency is missing or hpt resolves to another checkout
here=$(pwd -P)
where=$("$PY" - <<'PYEOF' 2>/dev/null || true
# every dependency pyproject.toml declares now (not what the last install recorded) must be there
import importlib.metadata as md, os, re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for raw in project["dependencies"] + project["optional-dependencies"]["dev"]:
    md.version(re.split(r"[<>=!~\[; ]", raw, maxsplit=1)[0])  # raises when it is missing
import hpt.controller
print(os.path.realpath(os.path.dirname(os.path.dirname(hpt.controller.__file__))))
PYEOF
)
if [ "$where" != "$here" ]; then
  echo "setup: pip install -e .[dev] into $VENV" >&2
  "$PY" -m pip install -q -e ".[dev]" >&2
fi
echo "$PY"
