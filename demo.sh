#!/usr/bin/env bash
# Sets up .venv (if needed), then trains DiffusionTrainer briefly on the bundled Hippocampus cases,
# predicts the held-out cases with nnUNetv2_predict and with a 4-sample ensemble + uncertainty maps
# (nnUNetv2_predict_diffusion), prints Dice per case and writes demo_output/demo.png.
set -euo pipefail
cd "$(dirname "$0")"
bash setup_venv.sh
exec .venv/bin/python -m nnunet_diffusion.demo "$@"
