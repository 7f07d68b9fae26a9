#!/usr/bin/env bash
# Creates .venv (if needed) and installs the project into it; EXTRAS (e.g. "[test]") selects extras.
# Sourced by demo.sh and run_tests.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
echo "Installing nnunet-diffusion${EXTRAS:-} and its dependencies (nnU-Net v2, PyTorch) into .venv ..."
# -qq: pip's and setuptools' warnings (index locations, editable-install notices) are noise to a user; errors
# still print, and set -e stops on them
.venv/bin/python -m pip install -qq --upgrade pip
.venv/bin/python -m pip install -qq -e ".${EXTRAS:-}"
echo "Installed: $(.venv/bin/python -c 'import nnunetv2, torch; from importlib.metadata import version; print("nnunetv2", version("nnunetv2"), "| torch", torch.__version__)')"
