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
