#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the default test suite. Extra arguments go to pytest
# (e.g. `-m slow` for the long runs).
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS="[test]" bash setup_venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q --durations=25 "$@"
