"""Entropy and mutual-information maps of ``nnUNetv2_predict_diffusion --uncertainty`` against values worked out by
hand, on model folds built to give known probabilities everywhere.

Each fold is the session's trained model with the final segmentation layer's weights set to zero and its bias
chosen, so the network's logits are that bias at every voxel, level and mirroring: a fold is certain of one class
(bias 40 on it: probability 1 - 2e-17) or uniform over the 3 classes (bias 0). With P_f a fold's probabilities:
entropy = H(mean_f P_f), mutual information = H(mean_f P_f) - mean_f H(P_f) (natural logarithms).
"""
import math
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET, TR, run

FOLDS = {0: [0.0, 40.0, 0.0],  # certain of class 1
         1: [0.0, 0.0, 40.0],  # certain of class 2
         2: [0.0, 0.0, 0.0]}   # uniform over the 3 classes
# each fold's probabilities: the softmax of its bias
FOLDS_P = {f: [math.exp(b) / sum(math.exp(c) for c in bias) for b in bias] for f, bias in FOLDS.items()}


def H(p):
    return -sum(x * math.log(x) for x in p if x > 0)


@pytest.fixture(scope="module")
def constant_folds(env, trained_3d, tmp_path_factory):
    """A results folder with folds 0, 1, 2 of ``FOLDS`` (copies of the trained model's checkpoint)."""
    results = tmp_path_factory.mktemp("constant_results")
    source = os.path.dirname(trained_3d)
    model = results / DATASET / os.path.basename(source)
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("fold_*"))
    checkpoint = torch.load(os.path.join(trained_3d, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    seg_layers = sorted({int(k.split("seg_layers.")[1].split(".")[0]) for k in checkpoint["network_weights"]
                         if "seg_layers." in k})
    final = f"seg_layers.{seg_layers[-1]}."  # the full-resolution output (the only one used in prediction)
    for fold, bias in FOLDS.items():
        weights = {}
        for k, v in checkpoint["network_weights"].items():
            if "seg_layers." in k:
                v = torch.zeros_like(v)
                if final + "bias" in k:
                    v = torch.tensor(bias, dtype=v.dtype)
            weights[k] = v
        assert sum(final + "bias" in k for k in weights) >= 1
        os.makedirs(model / f"fold_{fold}")
        torch.save(dict(checkpoint, network_weights=weights), model / f"fold_{fold}" / "checkpoint_final.pth")
    return dict(env, nnUNet_results=str(results))


def _maps(env, folds, out, *extra):
    inp = out.parent / "in"
    inp.mkdir(exist_ok=True)
    shutil.copy(os.path.join(env["raw"], "imagesTr", "case_003_0000.nii.gz"), inp)
    run([f"{BIN}/nnUNetv2_predict_diffusion", "-i", str(inp), "-o", str(out), "-d", "990", "-c", "3d_fullres",
         "-f", *[str(f) for f in folds], "-tr", TR, "-device", "cpu", "-npp", "1", "-nps", "1", "--uncertainty",
         "--disable_progress_bar", *extra], env=env)
    read = lambda name: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"case_003{name}.nii.gz")))  # noqa: E731
    return read("_entropy"), read("_mutual_info"), read("")


def test_two_certain_folds_that_disagree(constant_folds, tmp_path):
    """Folds 0 and 1, certain of classes 1 and 2: mean (0, 1/2, 1/2), so entropy = mutual information = ln 2 at
    every voxel (each fold alone has entropy 0)."""
    entropy, mutual_info, _ = _maps(constant_folds, (0, 1), tmp_path / "o")
    assert entropy.shape == (20, 24, 20)  # the whole case: no voxel cropped away
    np.testing.assert_allclose(entropy, math.log(2), atol=1e-4)
    np.testing.assert_allclose(mutual_info, math.log(2), atol=1e-4)


def test_a_certain_and_a_uniform_fold(constant_folds, tmp_path):
    """Folds 0 (certain of class 1) and 2 (uniform), two samples each: mean (1/6, 2/3, 1/6); entropy H(mean) =
    0.8676, mutual information H(mean) - (0 + ln 3) / 2 = 0.3183 (entropy and mutual information differ here, so
    one map written in place of the other fails); the segmentation, the argmax of the mean, is class 1."""
    entropy, mutual_info, seg = _maps(constant_folds, (0, 2), tmp_path / "o", "--num-samples", "2")
    mean = [1 / 6, 2 / 3, 1 / 6]
    np.testing.assert_allclose(entropy, H(mean), atol=1e-4)
    np.testing.assert_allclose(mutual_info, H(mean) - (H(FOLDS_P[0]) + H(FOLDS_P[2])) / 2, atol=1e-4)
    assert abs(H(mean) - 0.8676) < 1e-4 and abs(H(mean) - math.log(3) / 2 - 0.3183) < 1e-4
    assert np.all(seg == 1)

