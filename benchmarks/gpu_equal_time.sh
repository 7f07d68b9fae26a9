#!/usr/bin/env bash
# Issue 38's equal-time comparison on a lent GPU: every trainer timed alone, then each trained for the same
# training time as stock (its epochs scaled by the measured epoch-time ratio), all runs side by side, then compared
# (results/Dataset004_Hippocampus/equal_time_gpu_head/RULE.md reads the result).
#
#   OUT=/some/dir bash benchmarks/gpu_equal_time.sh --install-only   # a first call, carrying .whl
#   OUT=/some/dir bash benchmarks/gpu_equal_time.sh                  # the next, carrying .gpu, while still warm
#
# Two calls because the wheels (.whl: SimpleITK alone is 27 MB xz-compressed) and the data (.gpu/hip.tar.xz,
# 11 MB) do not travel together beside the tracked tree within the 64 MiB a call: the first installs the wheels
# into the machine's Python, which keeps them while the machine stays warm (30 s after a call). Where both fit (or
# nnunetv2 imports already), one call carrying both does everything.
#
# Steps: (a) the dataset unpacked, planned and preprocessed (3d_fullres) with the committed fold-0 split of
# accuracy_cpu_12x50 and batch 2 (the same plans as that folder's); (b) every trainer of METHODS timed alone
# (benchmarks/gpu_equal_time_budgets.py time: epochs of ITERS training and ITERS/5 validation steps, the trainers
# taking turns, at least TIMING_S seconds each) and its budget E = round(E_STOCK x t_stock / t), E_STOCK lowered
# where it would not fit before DEADLINE (EPOCH_WALL_S of wall clock per stock epoch side by side, RESERVE_S for
# start-up and final validations); (c) every method trained RUNS times at its budget, all runs side by side
# (benchmarks/accuracy_protocol.py --repeats, one per method; nnU-Net's final validation with its default
# mirroring); (d) the comparison against stock (benchmarks/equal_time.py: per-case run means, paired t-test,
# training-time ratio), each run's realised training time and each output (gpu_equal_time_budgets.py report);
# (e) at DEADLINE seconds after the start, training stops, the runs whose final validation finished are recorded,
# and everything is packed into $OUT. A line a minute shows each run's epochs.
#
# Settings (environment): METHODS (BASE:RUNS ..., the first is stock; default "nnUNetTrainer:3
# DiffusionTrainer_head:3 DiffusionTrainer:1"), E_STOCK (default 50), ITERS (default 100), TIMING_S (default 10),
# BATCH (default 2), DEVICE (default cuda), DEADLINE (default 530: recording and packing take up to a minute
# after it, the call's own limit is 600 s), EPOCH_WALL_S (default 4.4 x ITERS / 100), RESERVE_S (default 190),
# nnUNet_n_proc_DA (default: the cores shared by all runs, also while timing), nnUNet_def_n_proc (nnU-Net's export
# and metric workers in each final validation; default 4: all runs validate at about the same time, and 7 x 8
# workers would crowd 16 cores), DATA_DIR or DATA_TAR as in gpu_accuracy.sh.
# Sizing (H200, 16 cores; from accuracy_gpu_50x100 and accuracy_gpu_12x50): about 30 s for unpacking and planning,
# 60-80 s for the timing; with 7 runs side by side a stock epoch of 100 iterations takes about 3 s of nnU-Net's
# epoch time plus 1.4 s of logging and plotting, so stock's 50 epochs take about 230 s and its final validation
# about 60 s; the others train as long in epoch time but have fewer epochs, and DiffusionTrainer_head validates
# three outputs (mean, trunk, chain; 40-50 s each): the last runs should end 430-480 s after the start.
# Writes to $OUT: log.txt, timing.json, equal_time.md, equal_time.json, equal_time_runs.md, equal_time_runs.json,
# runs.tar.gz (every method's accuracy folder, the protocols' logs, the runs' nnU-Net logs, progress curves and
# validation summaries).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_equal_time_out}
DEVICE=${DEVICE:-cuda}
METHODS=${METHODS:-"nnUNetTrainer:3 DiffusionTrainer_head:3 DiffusionTrainer:1"}
E_STOCK=${E_STOCK:-50}
ITERS=${ITERS:-100}
TIMING_S=${TIMING_S:-10}
BATCH=${BATCH:-2}
DEADLINE=${DEADLINE:-530}
WORK=${WORK:-/tmp/gpu_equal_time}
source benchmarks/gpu_common.sh
# the carried wheels are too large to travel with the data in one call (the working tree's 64 MiB): a first call
# with .whl only installs them (into the machine's Python, which keeps them while the machine stays warm)
if [ "${1:-}" = "--install-only" ]; then echo "[$(elapsed) s] installed"; exit 0; fi
prepare_hippocampus || exit 1

BASES=() RUNS=()
for spec in $METHODS; do BASES+=("${spec%%:*}"); RUNS+=("${spec##*:}"); done
JOBS=0; for r in "${RUNS[@]}"; do JOBS=$(( JOBS + r )); done
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-$(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 ))}
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-4}
left() { echo $(( DEADLINE - $(elapsed) )); }

budget() { awk -v b="$1" '$1 == "BUDGET" && $2 == b {print $3}' "$WORK/budgets.txt" 2>/dev/null; }
TIMED=1; for base in "${BASES[@]}"; do [ -n "$(budget "$base")" ] || TIMED=0; done
if [ "$TIMED" -eq 0 ]; then  # (a rerun on the same WORK keeps the budgets it measured)
  echo "[$(elapsed) s] timing ${BASES[*]} alone (epochs of $ITERS iterations, at least $TIMING_S s each, nnUNet_n_proc_DA=$nnUNet_n_proc_DA)"
  # its own results root: the timing builds budget twins (<TRAINER>_1000ep<ITERS>it) that write their plans there
  nnUNet_results=$WORK/timing_results timeout -k 10 $(( $(left) - 60 )) $PY benchmarks/gpu_equal_time_budgets.py \
    time -o "$WORK/timing.json" --trainers "${BASES[@]}" --iterations "$ITERS" --seconds "$TIMING_S" \
    --stock-epochs "$E_STOCK" --batch-size "$BATCH" -device "$DEVICE" --finish-by $(( T0 + DEADLINE )) \
    --stock-epoch-wall-s "${EPOCH_WALL_S:-$(awk -v i="$ITERS" 'BEGIN {print 4.4 * i / 100}')}" --reserve-s "${RESERVE_S:-190}" \
    --protocol-work "$nnUNet_results/Dataset004_Hippocampus/accuracy_protocol_work" > "$WORK/budgets.txt" 2> "$WORK/timing.log"
  RC=$?
  grep -E '^# |Error|error' "$WORK/timing.log" | tail -20
  if [ "$RC" -ne 0 ]; then
    echo "[$(elapsed) s] timing failed (exit code $RC); last lines of its log:"; tail -30 "$WORK/timing.log"
    (cd "$WORK" && tar -czf "$OUT/runs.tar.gz" timing.log) 2>/dev/null
    exit "$RC"
  fi
fi

echo "[$(elapsed) s] training side by side ($JOBS runs, nnUNet_n_proc_DA=$nnUNet_n_proc_DA, deadline at $DEADLINE s):"
PIDS=() ARGS=()
for i in "${!BASES[@]}"; do
  base=${BASES[$i]} runs=${RUNS[$i]}
  epochs=$(budget "$base")
  # --jobs above 1 makes a single run go the --repeats way too (its own results root, recorded as a run)
  ARGS[$i]="-o $WORK/acc_$base --budget ${epochs}x$ITERS --batch-size $BATCH -device $DEVICE --trainers $base
    --repeats $runs --jobs $(( runs > 1 ? runs : 2 ))"
  echo "  $base: $runs run(s) at ${epochs}x$ITERS"
  timeout -s INT -k 20 "$(left)" $PY benchmarks/accuracy_protocol.py ${ARGS[$i]} > "$WORK/protocol_$base.log" 2>&1 &
  PIDS[$i]=$!
  sleep 2  # nnU-Net names a training log by its start second
done
# a line a minute while the runs train: each run's epochs so far (+val: its final validation finished)
progress() {
  while sleep 60; do
    line=""
    for f in "$nnUNet_results"/Dataset004_Hippocampus/accuracy_repeats/run*/*/*/fold_*/training_log_*.txt; do
      [ -e "$f" ] || continue
      run=${f#*accuracy_repeats/}; run=${run%%/*}; trainer=$(basename "$(dirname "$(dirname "$f")")")
      line="$line ${trainer%%__*}/$run:$(grep -c 'Epoch time' "$f")$(grep -q 'Validation complete' "$f" && echo +val)"
    done
    echo "[$(elapsed) s]$line"
  done
}
progress &
TICKER=$!
FOLDERS=() RC=0
for i in "${!BASES[@]}"; do
  base=${BASES[$i]}
  wait "${PIDS[$i]}"; rc=$?
  echo "[$(elapsed) s] $base: protocol exit code $rc"
  grep -E 'exit code' "$WORK/protocol_$base.log"
  if [ "$rc" -eq 124 ]; then  # DEADLINE: record the runs whose final validation finished
    $PY benchmarks/accuracy_protocol.py ${ARGS[$i]} --record-only > "$WORK/record_$base.log" 2>&1
    echo "[$(elapsed) s] $base: recording the finished runs: exit code $?"
    grep -E '^not finished|^RuntimeError' "$WORK/record_$base.log"
  elif [ "$rc" -ne 0 ]; then
    RC=$rc; tail -15 "$WORK/protocol_$base.log"
  fi
  [ -f "$WORK/acc_$base/accuracy.json" ] && FOLDERS+=("$base=$WORK/acc_$base")
done

kill "$TICKER" 2>/dev/null
echo "[$(elapsed) s] comparison"
COMPARE=()
for f in "${FOLDERS[@]:1}"; do COMPARE+=(--method "${f#*=}:${f%%=*}"); done
if [ ${#COMPARE[@]} -gt 0 ] && [ "${FOLDERS[0]%%=*}" = "${BASES[0]}" ]; then
  $PY benchmarks/equal_time.py -o "$WORK/equal_time" --reference "${FOLDERS[0]#*=}:${BASES[0]}" "${COMPARE[@]}" \
    > "$WORK/equal_time.log" 2>&1 || tail -5 "$WORK/equal_time.log"
fi
REPORT=(); for f in "${FOLDERS[@]}"; do REPORT+=(--folder "$f"); done
[ ${#REPORT[@]} -gt 0 ] && { $PY benchmarks/gpu_equal_time_budgets.py report --timing "$WORK/timing.json" \
  -o "$WORK/equal_time" "${REPORT[@]}" > "$WORK/report.log" 2>&1 || tail -5 "$WORK/report.log"; }
cat "$WORK/equal_time/equal_time.md" "$WORK/equal_time/equal_time_runs.md" 2>/dev/null
cp "$WORK"/timing.json "$WORK"/equal_time/equal_time{,_runs}.{md,json} "$OUT"/ 2>/dev/null
(cd "$WORK" && tar -czf "$OUT/runs.tar.gz" timing.json budgets.txt ./*.log acc_*/accuracy.* acc_*/logs \
  acc_*/nnUNetPlans.json acc_*/splits_final.json $(ls -d results/*/accuracy_repeats/run*/*/*/fold_*/{progress.png,training_log_*.txt,validation*/summary.json} \
  2>/dev/null)) 2>/dev/null
echo "[$(elapsed) s] results in $OUT"
exit $RC
