#!/usr/bin/env bash
# Sets up .venv (if needed), then trains DiffusionTrainer briefly on the bundled Hippocampus cases,
# predicts the held-out cases with nnUNetv2_predict, prints Dice and writes demo_output/demo_slice.png.
set -euo pipefail
cd "$(dirname "$0")"
bash setup_venv.sh
exec .venv/bin/python -m nnunet_diffusion.demo "$@"
