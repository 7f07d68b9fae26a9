#!/usr/bin/env bash
# After benchmarks/gpu_equal_time.sh, in the same call (same WORK and OUT): the triage of every final validation that
# saved probabilities (ACCURACY_NPZ=1; expected Dice against nnU-Net's true Dice, nnunet_diffusion/triage.py),
# packed into $OUT/extra.tar.gz (the probabilities themselves are deleted: they would not fit the transfer).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_equal_time}
OUT=${OUT:?set OUT}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK" || exit 1
for d in results/*/accuracy_repeats/run*/*/*/fold_0/validation*; do
  ls "$d"/*.npz > /dev/null 2>&1 || continue
  $PY -m nnunet_diffusion.triage -i "$d" --summary "$d/summary.json" --quality-out "$d/triage_quality.json" \
    > /dev/null 2>&1 || echo "triage failed: $d"
  rm -f "$d"/*.npz "$d"/*.pkl
done
tar -czf "$OUT/extra.tar.gz" $(ls -d results/*/accuracy_repeats/run*/*/*/fold_0/validation*/triage* 2>/dev/null) \
  2> /dev/null
ls -la "$OUT"
