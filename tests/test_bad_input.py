"""Bad input: images with NaN or Inf voxels through stock ``nnUNetv2_predict`` (the network's own check refuses
them), and a missing or empty input folder for ``nnUNetv2_predict_diffusion`` (a clear error, nothing written)."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BIN, DATASET, TR, run


def _write_like(reference: str, path: str, change) -> np.ndarray:
    """A copy of the image ``reference`` (same geometry) with ``change(array)`` applied; returns the array."""
    img = sitk.ReadImage(reference)
    arr = sitk.GetArrayFromImage(img)
    change(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, path)
    return arr


BAD_VALUES = {"nan": np.nan, "inf": np.inf}


def _poison(value):
    def change(arr):
        arr[2, 3, 4] = value
        arr[10, 11, 12] = -value if value == np.inf else value
    return change


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_what_each_nnunet_reader_does_with_non_finite_voxels(env, tmp_path, bad):
    """SimpleITK's NIfTI reader (nnU-Net's default, SimpleITKIO) turns NaN and Inf into 0 before nnU-Net sees them;
    nnU-Net's NibabelIO keeps them (README, bad input)."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    path = str(tmp_path / "case_000_0000.nii.gz")
    written = _write_like(os.path.join(env["raw"], "imagesTr", "case_003_0000.nii.gz"), path,
                          _poison(BAD_VALUES[bad]))
    assert (~np.isfinite(written)).sum() == 2
    sitk_data, _ = SimpleITKIO().read_images([path])
    assert np.isfinite(sitk_data).all()
    assert sitk_data[0, 2, 3, 4] == 0 and sitk_data[0, 10, 11, 12] == 0
    nib_data, _ = NibabelIO().read_images([path])
    assert (~np.isfinite(nib_data)).sum() == 2


@pytest.fixture(scope="module")
def nibabel_model(env, trained_3d, tmp_path_factory):
    """The trained model with plans that read images with nnU-Net's NibabelIO, in a results folder of its own."""
    results = tmp_path_factory.mktemp("nibabel_results")
    model = results / DATASET / os.path.basename(os.path.dirname(trained_3d))
    shutil.copytree(os.path.dirname(trained_3d), model, ignore=shutil.ignore_patterns("validation", "*.png"))
    plans = json.load(open(model / "plans.json"))
    assert plans["image_reader_writer"] == "SimpleITKIO"  # what planning chose for .nii.gz
    plans["image_reader_writer"] = "NibabelIO"
    json.dump(plans, open(model / "plans.json", "w"), indent=1)
    return dict(env, nnUNet_results=str(results))


def test_non_finite_image_is_refused_by_stock_predict(nibabel_model, tmp_path):
    """Stock nnUNetv2_predict with a diffusion trainer, reading with NibabelIO: a clean case first (predicted and
    written: the reader and the model work), then a case with a NaN and an Inf voxel, which nnU-Net's normalisation
    spreads over the whole image and the network refuses: non-zero exit, a message naming NaN/Inf, no file for it."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    source = os.path.join(nibabel_model["raw"], "imagesTr", "case_003_0000.nii.gz")
    shutil.copy(source, inp / "case_001_0000.nii.gz")

    def poison(arr):
        arr[2, 3, 4], arr[10, 11, 12] = np.nan, np.inf
    _write_like(source, str(inp / "case_002_0000.nii.gz"), poison)
    proc = run([f"{BIN}/nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", "990", "-c", "3d_fullres", "-f",
                "0", "-tr", TR, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"],
               env=nibabel_model, check=False)
    assert proc.returncode != 0
    assert "NaN/Inf" in proc.stderr, proc.stderr[-2000:]
    assert (out / "case_001.nii.gz").is_file()
    assert not (out / "case_002.nii.gz").exists()


@pytest.fixture
def predict_cli(inproc, trained_3d, monkeypatch, capsys):
    """``nnUNetv2_predict_diffusion``'s main in this process (what the installed command runs): returns the exit
    code and stderr."""
    import nnunetv2.utilities.file_path_utilities as paths

    from nnunet_diffusion.predict_cli import main
    monkeypatch.setattr(paths, "nnUNet_results", inproc["nnUNet_results"])

    def predict(inp, out):
        capsys.readouterr()
        rc = main(["-i", str(inp), "-o", str(out), "-d", DATASET, "-c", "3d_fullres", "-f", "0", "-tr", TR,
                   "-device", "cpu", "--disable_progress_bar"])
        return rc, capsys.readouterr().err
    return predict


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_or_empty_input_folder(predict_cli, tmp_path, folder):
    """A clear error naming the folder, exit code 1, and the output folder's existing files untouched."""
    inp = tmp_path / "in"
    if folder == "empty":
        inp.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "case_003.nii.gz"
    earlier.write_bytes(b"an earlier prediction")
    rc, err = predict_cli(inp, out)
    assert rc == 1
    assert str(inp) in err
    assert ("does not exist" if folder == "missing" else "no images ending in .nii.gz") in err
    assert sorted(os.listdir(out)) == ["case_003.nii.gz"] and earlier.read_bytes() == b"an earlier prediction"
