#!/usr/bin/env bash
# The script behind the README's GPU Table 1: an offline GPU machine, one fixed wall-clock window.
#
#   OUT=/some/dir SECONDS_LIMIT=480 bash benchmarks/gpu_table1.sh
#
# Expects (both prepared beside the checkout, not tracked):
#   .whl/      wheels of nnunetv2 and its dependencies missing on the machine (plus sitk.tar.xz: SimpleITK's
#              wheel contents, xz-compressed to fit the transfer limit); skipped if nnunetv2 imports already
#   .gpu/hip.tar.xz   Dataset004_Hippocampus with its .nii.gz files unpacked to .nii (xz packs them smaller)
# Then: plan and preprocess (2d, 3d_fullres), and benchmarks/timeboxed_experiment.py table1 with the
# largest equal budget that fits SECONDS_LIMIT. Results are packed into $OUT (a few files).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_table1_out}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-4}
DATASET_ID=${DATASET_ID:-4}
DATA_TAR=${DATA_TAR:-.gpu/hip.tar.xz}
SECONDS_LIMIT=${SECONDS_LIMIT:-480}
WORK=${WORK:-/tmp/gpu_table1}
source benchmarks/gpu_common.sh

export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
export nnUNet_compile=${nnUNet_compile:-f} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-3}
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
echo "[$(elapsed) s] unpacking $DATA_TAR"
tar -xJf "$DATA_TAR" -C "$nnUNet_raw" || exit 1
find "$nnUNet_raw" -name '*.nii' -print0 | xargs -0 -r -P "$(nproc)" -n 16 gzip -1
echo "[$(elapsed) s] planning and preprocessing"
NP=$(( $(nproc) > 8 ? 8 : $(nproc) ))
nnUNet_n_proc_DA=$NP nnUNetv2_plan_and_preprocess -d "$DATASET_ID" -c 2d 3d_fullres -np "$NP" "$NP" \
  > "$WORK/plan.log" 2>&1 || { tail -30 "$WORK/plan.log"; exit 1; }

LEFT=$(( SECONDS_LIMIT - $(elapsed) ))
echo "[$(elapsed) s] time-boxed table1 in $LEFT s, $JOBS jobs at a time, nnUNet_n_proc_DA=$nnUNet_n_proc_DA"
$PY benchmarks/timeboxed_experiment.py table1 -d "$DATASET_ID" --seconds "$LEFT" --jobs "$JOBS" \
  --epochs "${EPOCHS:-10}" --calibration "${CALIB:-2x20}" -device "$DEVICE" -o "$WORK/experiment"
RC=$?
echo "[$(elapsed) s] experiment exit code $RC"
cp "$WORK"/experiment/timebox.json "$OUT"/ 2>/dev/null
cp "$WORK"/experiment/table1_*/table1.md "$OUT"/ 2>/dev/null
(cd "$WORK" && tar -czf "$OUT/experiment.tar.gz" experiment/*/*.md experiment/*/*.json experiment/*/*.log \
  experiment/*/*/report.* experiment/*/*/per_class_dice.png plan.log \
  $(ls -d results/*/*/fold_*/{training_log_*.txt,progress.png,debug.json,validation/summary.json} \
    preprocessed/*/nnUNetPlans.json preprocessed/*/splits_final.json 2>/dev/null)) 2>/dev/null
echo "[$(elapsed) s] packed results into $OUT"
exit $RC
