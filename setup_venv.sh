#!/usr/bin/env bash
# Creates .venv (if needed) and installs the project into it; EXTRAS (e.g. "[test]") selects extras.
# Sourced by demo.sh and run_tests.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${EXTRAS:-}"
