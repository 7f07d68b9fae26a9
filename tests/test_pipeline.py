"""End to end through real nnU-Net commands on a tiny synthetic dataset:
plan + preprocess -> nnUNetv2_train (3d_fullres, 2d) -> --c -> nnUNetv2_predict -> evaluation."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET, TR, _fold, _train, run


def test_train_3d_writes_nnunet_outputs(trained_3d):
    for f in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
        assert os.path.isfile(os.path.join(trained_3d, f)), f
    ckpt = torch.load(os.path.join(trained_3d, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TR
    assert any(k.startswith("time_proj") for k in ckpt["network_weights"])
    # the first conv sees image + C mask channels
    w = ckpt["network_weights"]["unet.encoder.stages.0.0.convs.0.conv.weight"]
    assert w.shape[1] == 1 + 3
    summary = json.load(open(os.path.join(trained_3d, "validation", "summary.json")))
    assert np.isfinite(summary["foreground_mean"]["Dice"])


def test_continue_training_from_checkpoint(env, trained_3d):
    """--c picks up checkpoint_latest (here: the state after epoch 0) and trains only the missing epoch."""
    final = os.path.join(trained_3d, "checkpoint_final.pth")
    latest = os.path.join(trained_3d, "checkpoint_latest.pth")
    backup = final + ".bak"
    shutil.copy(final, backup)
    try:
        ckpt = torch.load(final, map_location="cpu", weights_only=False)
        ckpt["current_epoch"] = 1
        torch.save(ckpt, latest)
        os.remove(final)
        proc = _train(env, TR, extra=("--c",))
        assert "Epoch 1" in proc.stdout and "Epoch 0\n" not in proc.stdout
        resumed = torch.load(final, map_location="cpu", weights_only=False)
        assert resumed["current_epoch"] == 2
        assert not os.path.isfile(latest)  # nnU-Net removes it after the final save
    finally:
        if not os.path.isfile(final):
            shutil.copy(backup, final)
        os.remove(backup)


@pytest.mark.slow  # ~50 s on 2 cores; the 2D paths of the network and predictor have unit tests
def test_train_2d(env):
    proc = _train(env, "DiffusionTrainer_1ep2it", config="2d")
    assert "Mean Validation Dice" in proc.stdout
    assert os.path.isfile(os.path.join(_fold(env, "DiffusionTrainer_1ep2it", "2d"), "checkpoint_final.pth"))


def _direct_logits(env, fold_dir, case):
    """Logits of the checkpoint's network called directly on the preprocessed case, with nnU-Net's
    default mirroring (mean over all flips), no sliding window (the case is one patch)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_diffusion.budget import make_budget_trainer

    pm = PlansManager(load_json(os.path.join(fold_dir, "..", "plans.json")))
    cm = pm.get_configuration("3d_fullres")
    ckpt = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    net = make_budget_trainer(TR).build_network_architecture(pm, cm, 1, 3, False)
    net.load_state_dict(ckpt["network_weights"])
    net.eval()
    folder = os.path.join(env["nnUNet_preprocessed"], DATASET, cm.data_identifier)
    ds = infer_dataset_class(folder)(folder, [case])
    data = torch.from_numpy(np.asarray(ds.load_case(case)[0][:]))[None].float()
    assert tuple(data.shape[2:]) == tuple(cm.patch_size)
    axes = ckpt["inference_allowed_mirroring_axes"]
    import itertools
    combos = [()] + [c for i in range(len(axes)) for c in itertools.combinations([a + 2 for a in axes], i + 1)]
    with torch.no_grad():
        logits = sum(torch.flip(net(torch.flip(data, c)), c) if c else net(data) for c in combos) / len(combos)
    return logits[0]


def test_predict_with_stock_command_matches_direct_network_call(env, trained_3d, tmp_path):
    case = "case_003"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(os.path.join(env["raw"], "imagesTr", f"{case}_0000.nii.gz"), inp)
    out = tmp_path / "out"
    run([f"{BIN}/nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", "990", "-c", "3d_fullres", "-f", "0",
         "-tr", TR, "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1"], env=env)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
    probs = np.load(out / f"{case}.npz")["probabilities"]

    logits = _direct_logits(env, trained_3d, case)
    # the sliding window stores gaussian-weighted logits in float16; apply the same rounding
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    g = compute_gaussian(tuple(logits.shape[1:]), sigma_scale=1. / 8, value_scaling_factor=10,
                         device=torch.device("cpu"))
    logits = (logits * g).half() / g
    direct = torch.softmax(logits.float(), 0).numpy()
    assert probs.shape == direct.shape and seg.shape == direct.shape[1:]
    np.testing.assert_allclose(probs, direct, atol=2e-3)
    top2 = np.sort(direct, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-2
    assert clear.mean() > 0.9
    assert np.array_equal(seg[clear], direct.argmax(0)[clear])

    # nnU-Net's own evaluation of the exported file
    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(os.path.join(env["raw"], "labelsTr", f"{case}.nii.gz"), gt)
    run([f"{BIN}/nnUNetv2_evaluate_folder", str(gt), str(out), "-djfile", str(out / "dataset.json"),
         "-pfile", str(out / "plans.json"), "-np", "1"], env=env)
    summary = json.load(open(out / "summary.json"))
    # nnU-Net's number is the Dice of the exported file against the label, per class, computed here by hand
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(gt / f"{case}.nii.gz")))
    dice = [2 * ((seg == c) & (label == c)).sum() / ((seg == c).sum() + (label == c).sum())
            for c in (1, 2) if (seg == c).sum() + (label == c).sum()]
    assert dice and summary["foreground_mean"]["Dice"] == pytest.approx(np.mean(dice), abs=1e-6)


@pytest.mark.slow  # ~70 s on 2 cores (trains a stock model too)
def test_find_best_configuration_against_stock(env, trained_3d, trained_stock_3d):
    proc = run([f"{BIN}/nnUNetv2_find_best_configuration", "990", "-c", "3d_fullres", "-tr",
                "nnUNetTrainer_2ep3it", TR, "-f", "0", "--disable_ensembling", "-np", "1"], env=env)
    result = json.load(open(os.path.join(env["nnUNet_results"], DATASET, "inference_information.json")))
    scores = result["all_results"]
    assert set(scores) == {f"{TR}__nnUNetPlans__3d_fullres", "nnUNetTrainer_2ep3it__nnUNetPlans__3d_fullres"}, \
        proc.stdout[-2000:]
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_ensemble_with_stock_and_uncertainty_report(env, trained_3d, trained_stock_3d, tmp_path):
    """nnUNetv2_ensemble averages a diffusion and a stock --save_probabilities folder as they are; the
    uncertainty command scores both folders (our entropy map, stock's softmax entropy) with one code."""
    inp, gt = tmp_path / "in", tmp_path / "gt"
    inp.mkdir()
    gt.mkdir()
    for case in ("case_003", "case_007"):
        shutil.copy(os.path.join(env["raw"], "imagesTr", f"{case}_0000.nii.gz"), inp)
        shutil.copy(os.path.join(env["raw"], "labelsTr", f"{case}.nii.gz"), gt)
    common = ["-i", str(inp), "-d", "990", "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--save_probabilities"]
    diff, stock, ens = tmp_path / "diffusion", tmp_path / "stock", tmp_path / "ensemble"
    run([f"{BIN}/nnUNetv2_predict_diffusion", *common, "-o", str(diff), "-tr", TR, "--num-samples", "2",
         "--uncertainty", "--tta", "off", "-npp", "1", "-nps", "1"], env=env)  # the maps need export workers
    # stock in nnU-Net's sequential mode (-npp/-nps 0): no worker processes to start
    run([f"{BIN}/nnUNetv2_predict", *common, "-o", str(stock), "-tr", "nnUNetTrainer_2ep3it", "--disable_tta",
         "-npp", "0", "-nps", "0"], env=env)
    run([f"{BIN}/nnUNetv2_ensemble", "-i", str(diff), str(stock), "-o", str(ens), "-np", "1"], env=env)
    for case in ("case_003", "case_007"):
        p = (np.load(diff / f"{case}.npz")["probabilities"] + np.load(stock / f"{case}.npz")["probabilities"]) / 2
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ens / f"{case}.nii.gz")))
        top2 = np.sort(p, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-3
        assert np.array_equal(seg[clear], p.argmax(0)[clear])
    rep = tmp_path / "report"
    run([f"{BIN}/nnunet-diffusion", "uncertainty", str(gt), str(diff), str(stock), "-o", str(rep),
         "--map", "entropy", "probabilities", "--names", "diffusion", "stock"], env=env)
    report = json.load(open(rep / "report.json"))
    assert report["cases"] == ["case_003", "case_007"]
    for name in ("diffusion", "stock"):
        r = report["methods"][name]
        assert r["calibration"] is not None and 0 <= r["calibration"]["ece"] <= 1
        assert r["voxel"]["auroc"] is None or 0 <= r["voxel"]["auroc"] <= 1
