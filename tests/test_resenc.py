"""DiffusionTrainer with nnU-Net's residual-encoder presets (nnUNetPlannerResEncM, nnU-Net's recommendation):
planning, training with validation, and prediction through both commands with ``-p``."""
import json
import os

import numpy as np
import SimpleITK as sitk

from conftest import BIN, DATASET, run

PLANS = "nnUNetResEncUNetMPlans"


def test_resenc_plans_train_validate_and_predict(env, tmp_path):
    pre_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # 0 breaks planning and preprocessing
    run([f"{BIN}/nnUNetv2_plan_experiment", "-d", "990", "-pl", "nnUNetPlannerResEncM"], env=pre_env)
    plans_file = os.path.join(env["nnUNet_preprocessed"], DATASET, f"{PLANS}.json")
    plans = json.load(open(plans_file))
    arch = plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
    assert arch.endswith("ResidualEncoderUNet")
    run([f"{BIN}/nnUNetv2_preprocess", "-d", "990", "-plans_name", PLANS, "-c", "3d_fullres", "-np", "1"],
        env=pre_env)
    tr = "DiffusionTrainer_1ep2it"
    proc = run([f"{BIN}/nnUNetv2_train", "990", "3d_fullres", "0", "-tr", tr, "-p", PLANS, "-device", "cpu"],
               env=env)
    assert "Mean Validation Dice" in proc.stdout
    fold = os.path.join(env["nnUNet_results"], DATASET, f"{tr}__{PLANS}__3d_fullres", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(os.path.join(env["raw"], "imagesTr", "case_003_0000.nii.gz"), inp / "case_003_0000.nii.gz")
    common = ["-i", str(inp), "-d", "990", "-c", "3d_fullres", "-f", "0", "-tr", tr, "-p", PLANS, "-device", "cpu",
              "-npp", "0", "-nps", "0"]  # nnU-Net's sequential mode: no worker processes to start
    run([f"{BIN}/nnUNetv2_predict", *common, "-o", str(tmp_path / "stock"), "--disable_tta"], env=env)
    run([f"{BIN}/nnUNetv2_predict_diffusion", *common, "-o", str(tmp_path / "diff"), "--tta", "off"], env=env)
    ref = sitk.ReadImage(str(inp / "case_003_0000.nii.gz"))
    for name in ("stock", "diff"):
        seg = sitk.ReadImage(str(tmp_path / name / "case_003.nii.gz"))
        assert seg.GetSize() == ref.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}
