#!/usr/bin/env bash
# The accuracy issue's GPU comparison in one command: stock nnU-Net and the diffusion trainer(s), each trained
# several times at one equal, longer budget, side by side on one GPU, then compared through the per-case mean over
# each method's runs (benchmarks/accuracy_protocol.py --repeats).
#
#   OUT=/some/dir bash benchmarks/gpu_accuracy.sh
#
# Settings (environment): BUDGET (EPOCHSxITERATIONS, default 30x100), REPEATS (runs per trainer, default 3),
# TRAINERS (default "nnUNetTrainer DiffusionTrainer"), JOBS (trainings side by side, default: all), BATCH (default
# 2, the CPU study's), DEVICE (default cuda), nnUNet_n_proc_DA (default: the cores shared by the trainings side by
# side), DEADLINE (seconds after the start; default 0, none): at DEADLINE the protocol is interrupted, the runs whose
# final validation finished are recorded (accuracy_protocol.py --record-only, seconds), and what every run wrote so
# far (training logs with their per-epoch pseudo Dice) is packed into $OUT; leave a minute between DEADLINE and
# the call's own time limit.
# Data: DATA_DIR (a Dataset004_Hippocampus folder, linked) or DATA_TAR (default .gpu/hip.tar.xz: the dataset with
# its .nii.gz files unpacked to .nii, which xz packs smaller; prepared beside the checkout, not tracked).
# Python: nnunetv2 must import, or .whl/ beside the checkout holds its wheels (benchmarks/gpu_common.sh).
# Sizing (H200, 16 cores; from the Table 1 run, four trainings side by side): about 0.03 s (stock) and 0.05 s
# (diffusion) per iteration at batch 2 in 3d_fullres, plus 1-3 minutes of start-up and final validation per run:
# 6 runs of 30x100 should take 5-7 minutes after planning; check the log's timings before raising the budget.
# Writes to $OUT: accuracy.md, accuracy.json, log.txt and runs.tar.gz (training logs, plans, split).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_accuracy_out}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-30x100}
REPEATS=${REPEATS:-3}
TRAINERS=${TRAINERS:-"nnUNetTrainer DiffusionTrainer"}
BATCH=${BATCH:-2}
WORK=${WORK:-/tmp/gpu_accuracy}
source benchmarks/gpu_common.sh

prepare_hippocampus || exit 1

set -- $TRAINERS
JOBS=${JOBS:-$(( $# * REPEATS ))}
# share the cores between the trainings side by side
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-$(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 ))}
echo "[$(elapsed) s] $TRAINERS, $REPEATS runs each at $BUDGET (batch $BATCH), $JOBS side by side, nnUNet_n_proc_DA=$nnUNet_n_proc_DA"
DEADLINE=${DEADLINE:-0}
LIMIT=()
[ "$DEADLINE" -gt 0 ] && LIMIT=(timeout -s INT -k 20 $(( DEADLINE - $(elapsed) )))
PROTOCOL=(benchmarks/accuracy_protocol.py -o "$WORK/accuracy" --budget "$BUDGET" --batch-size "$BATCH" -device "$DEVICE"
  --trainers $TRAINERS --repeats "$REPEATS" --jobs "$JOBS")
"${LIMIT[@]}" $PY "${PROTOCOL[@]}"
RC=$?
echo "[$(elapsed) s] protocol exit code $RC"
if [ "$RC" -eq 124 ]; then  # DEADLINE: record the runs whose final validation finished
  $PY "${PROTOCOL[@]}" --record-only > "$WORK/record.log" 2>&1
  RECORDED=$?
  echo "[$(elapsed) s] recording the finished runs: exit code $RECORDED"
  grep -E '^not finished|^RuntimeError' "$WORK/record.log"
  cp "$WORK/record.log" "$OUT/" 2>/dev/null
fi
cp "$WORK"/accuracy/accuracy.md "$WORK"/accuracy/accuracy.json "$OUT"/ 2>/dev/null
(cd "$WORK" && tar -czf "$OUT/runs.tar.gz" accuracy/logs accuracy/nnUNetPlans.json accuracy/splits_final.json \
  $(ls -d results/*/accuracy_repeats/run*/*/*/fold_*/{progress.png,training_log_*.txt,validation/summary.json} \
  2>/dev/null)) 2>/dev/null
echo "[$(elapsed) s] results in $OUT"
exit $RC
