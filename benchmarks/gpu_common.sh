# Sourced by the GPU scripts (gpu_table1.sh, gpu_accuracy.sh) from the checkout's root, with T0, OUT and WORK set:
# logs everything to $OUT/log.txt, defines elapsed and PY, installs the carried wheels when nnunetv2 does not
# import (.whl/*.whl, plus .whl/*.tar.xz: wheels' contents unpacked into site-packages, xz-compressed to fit the
# transfer limit, e.g. sitk.tar.xz for SimpleITK and site.tar.xz for nnunetv2's other dependencies),
# puts this checkout on PYTHONPATH with its trainers, and prints the machine's torch, GPU and nnunetv2.
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
elapsed() { echo $(( $(date +%s) - T0 )); }
PY=${PYTHON:-python3}
export PATH="$($PY -c 'import os,sys; print(os.path.dirname(sys.executable))'):$PATH"
if ! $PY -c "import nnunetv2, SimpleITK" 2>/dev/null; then
  echo "[$(elapsed) s] installing wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
  SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for t in .whl/*.tar.xz; do [ -e "$t" ] && { tar -xJf "$t" -C "$SITE" || exit 1; }; done
fi
# this checkout, used in place (nnUNetv2_train runs outside it, so a path, not the current folder)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" nnUNet_extTrainer="$PWD/trainers"
$PY -c "import torch, importlib.metadata as md; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'nnunetv2', md.version('nnunetv2'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

# Dataset004_Hippocampus planned and preprocessed (3d_fullres) under $WORK (nnUNet_raw, nnUNet_preprocessed and
# nnUNet_results exported): DATA_DIR (a Dataset004_Hippocampus folder, linked) or DATA_TAR (default
# .gpu/hip.tar.xz), and the committed fold-0 split (SPLIT). Skips what is done.
prepare_hippocampus() {
  export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
  export nnUNet_compile=${nnUNet_compile:-f}
  mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
  if [ ! -e "$nnUNet_raw/Dataset004_Hippocampus" ]; then
    if [ -n "${DATA_DIR:-}" ]; then
      ln -s "$(realpath "$DATA_DIR")" "$nnUNet_raw/Dataset004_Hippocampus"
    else
      echo "[$(elapsed) s] unpacking ${DATA_TAR:=.gpu/hip.tar.xz}"
      tar -xJf "$DATA_TAR" -C "$nnUNet_raw" || return 1
      find "$nnUNet_raw" -name '*.nii' -print0 | xargs -0 -r -P "$(nproc)" -n 16 gzip -1
    fi
  fi
  if [ ! -d "$nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans_3d_fullres" ]; then
    echo "[$(elapsed) s] planning and preprocessing 3d_fullres"
    NP=$(( $(nproc) > 8 ? 8 : $(nproc) ))
    # without nnUNet_n_proc_DA: 0 (a CPU check's setting) breaks the planner's torch.set_num_threads
    env -u nnUNet_n_proc_DA nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np "$NP" > "$WORK/plan.log" 2>&1 ||
      { tail -30 "$WORK/plan.log"; return 1; }
  fi
  # the CPU study's split (the same 42 validation cases of fold 0); SPLIT overrides it
  SPLIT=${SPLIT:-results/Dataset004_Hippocampus/accuracy_cpu_12x50/splits_final.json}
  [ -f "$SPLIT" ] && cp "$SPLIT" "$nnUNet_preprocessed/Dataset004_Hippocampus/splits_final.json"
  return 0
}
