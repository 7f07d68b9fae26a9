"""DiffusionTrainer with nnU-Net's residual-encoder presets (nnUNetPlannerResEncM, nnU-Net's recommendation):
the network built from ResEnc plans (default run), and planning, training with validation, and prediction through
both commands with ``-p`` (``slow``: about 2 minutes on 2 cores, most of it the ResEnc network on the CPU)."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET, run

PLANS = "nnUNetResEncUNetMPlans"


def _plan_resenc(env):
    pre_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # 0 breaks planning and preprocessing
    plans_file = os.path.join(env["nnUNet_preprocessed"], DATASET, f"{PLANS}.json")
    if not os.path.isfile(plans_file):
        run([f"{BIN}/nnUNetv2_plan_experiment", "-d", "990", "-pl", "nnUNetPlannerResEncM"], env=pre_env)
    plans = json.load(open(plans_file))
    arch = plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
    assert arch.endswith("ResidualEncoderUNet")
    return plans, pre_env


def test_resenc_plans_build_a_diffusion_network(env):
    """The trainer builds its network from ResEnc plans like stock does (the same ResidualEncoderUNet, its input
    grown by the C mask channels), and one denoising step and the chain run on it."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_diffusion.trainer import DiffusionTrainer
    plans, _ = _plan_resenc(env)
    dataset_json = json.load(open(os.path.join(env["nnUNet_preprocessed"], DATASET, "dataset.json")))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    num_classes = len(dataset_json["labels"])
    net = DiffusionTrainer.build_network_architecture(pm, cm, 1, num_classes, enable_deep_supervision=False)
    assert type(net.denoiser.unet).__name__ == "ResidualEncoderUNet"
    first_conv = next(m for m in net.denoiser.unet.modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.in_channels == 1 + num_classes
    torch.manual_seed(0)
    image = torch.randn(1, 1, *cm.patch_size)
    with torch.no_grad():
        xt = torch.randn(1, num_classes, *cm.patch_size)
        out = net(image, xt, torch.tensor([500.0]))
        chain = net(image)
        # the untrained time path is the identity: one step is the planned U-Net on (image, x_t), in that order
        planned = net.denoiser.unet(torch.cat([image, xt], 1))
    for logits in (out, chain):  # without deep supervision: one tensor of logits at full resolution
        assert torch.is_tensor(logits) and logits.shape == (1, num_classes, *cm.patch_size)
        assert torch.isfinite(logits).all()
    torch.testing.assert_close(out, planned)


@pytest.mark.slow
def test_resenc_plans_train_validate_and_predict(env, tmp_path):
    _, pre_env = _plan_resenc(env)
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
