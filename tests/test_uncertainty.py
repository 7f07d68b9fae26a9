"""`nnunet-diffusion uncertainty`: analytic cases for every score, and the command on written folders."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nnunet_diffusion.uncertainty import (auroc, average_precision, brier, entropy_of, expected_dice, expected_dice_qc,
                                          qc_scores, region_of,
                                          reliability)

CLI = os.path.join(os.path.dirname(sys.executable), "nnunet-diffusion")


def test_auroc_of_perfect_constant_and_reversed_maps():
    rng = np.random.default_rng(0)
    err = rng.random(1000) < 0.2
    assert auroc(err.astype(float), err) == 1.0
    assert auroc(np.full(1000, 0.3), err) == 0.5
    assert auroc(-err.astype(float), err) == 0.0
    assert auroc(np.ones(5), np.zeros(5, bool)) is None


def test_auroc_and_average_precision_hand_computed():
    score = np.array([0.9, 0.8, 0.7, 0.6])
    pos = np.array([1, 0, 1, 0], bool)
    # pairs (pos, neg): 0.9>0.8, 0.9>0.6, 0.7<0.8, 0.7>0.6 -> 3/4
    assert auroc(score, pos) == pytest.approx(0.75)
    # thresholds 0.9: recall 1/2 at precision 1; 0.7: recall 1 at precision 2/3
    assert average_precision(score, pos) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # ties: one group of equal scores is one threshold (precision = prevalence)
    assert average_precision(np.zeros(10), np.arange(10) < 3) == pytest.approx(0.3)
    assert average_precision(pos.astype(float), pos) == 1.0


def test_ece_near_zero_when_calibrated_and_the_gap_when_overconfident():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.34, 1.0, 400_000)
    calibrated = rng.random(conf.size) < conf
    assert reliability(conf, calibrated)["ece"] < 0.005
    over = rng.random(conf.size) < conf - 0.2
    assert reliability(conf, over)["ece"] == pytest.approx(0.2, abs=0.01)
    rel = reliability(np.array([0.05, 0.95, 0.95]), np.array([0, 1, 0]), bins=10)
    assert rel["count"][0] == 1 and rel["count"][9] == 2
    assert rel["accuracy"][9] == 0.5 and rel["ece"] == pytest.approx((0.05 + 2 * 0.45) / 3)
    # an under- and an over-confident bin do not cancel
    assert reliability(np.array([0.25, 0.95]), np.array([1, 0]), bins=10)["ece"] == pytest.approx((0.75 + 0.95) / 2)


def test_brier_and_entropy_hand_computed():
    p = np.array([[0.7, 0.2], [0.2, 0.5], [0.1, 0.3]])  # (C=3, N=2)
    ref = np.array([0, 2])
    expected = ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.2 ** 2 + 0.5 ** 2 + 0.7 ** 2)) / 2
    assert brier(p, ref) == pytest.approx(expected)
    assert entropy_of(np.array([[0.5], [0.5]]))[0] == pytest.approx(np.log(2))
    assert entropy_of(np.array([[1.0], [0.0]]))[0] == pytest.approx(0, abs=1e-9)


def test_region_is_the_foreground_dilated_in_mm():
    ref = np.zeros((1, 1, 21), np.uint8)
    ref[0, 0, 10] = 1
    r = region_of(ref, np.zeros_like(ref), (1.0, 1.0, 0.5), margin_mm=2.0)
    assert np.flatnonzero(r[0, 0]).tolist() == list(range(6, 15))  # 4 voxels of 0.5 mm each side


def test_qc_spearman_and_worst_case_flagging():
    per_case = {f"c{i}": {"dice": 0.9 - 0.05 * i, "mean_uncertainty": 0.1 * i} for i in range(10)}
    q = qc_scores(per_case, 0.1)
    assert q["spearman"] == pytest.approx(-1.0)
    assert q["worst_cases"] == ["c9"] and q["worst_auroc"] == 1.0
    per_case["c9"]["mean_uncertainty"] = -1.0  # the worst case now looks the most certain
    assert qc_scores(per_case, 0.1)["worst_auroc"] == 0.0


def test_expected_dice_is_the_dice_the_probabilities_predict():
    pred = np.zeros((4, 6, 6), np.uint8)
    pred[1:3, 1:4, 1:4] = 1  # 18 voxels of label 1
    pred[1:3, 4:6, 4:6] = 2  # 8 voxels of label 2
    probs = np.zeros((3, *pred.shape))
    probs[pred, *np.indices(pred.shape)] = 1.0
    assert expected_dice(probs, pred, [1, 2]) == pytest.approx(1.0)  # certain of its own map: expects Dice 1
    probs[1][pred == 1] = 0.5  # half sure of label 1 where it predicts it, nowhere else: 2*9 / (18 + 9)
    probs[0][pred == 1] = 0.5
    assert expected_dice(probs, pred, [1, 2]) == pytest.approx((2 / 3 + 1.0) / 2)
    probs[1][0, 0, 0] = 0.3  # probability of label 1 outside the predicted region lowers it further
    assert expected_dice(probs, pred, [1, 2]) == pytest.approx((2 * 9 / (18 + 9.3) + 1.0) / 2)
    # only the labels the reference contains are scored, as in the case Dice
    ref = np.where(pred == 2, 2, 0).astype(np.uint8)
    assert expected_dice(probs, pred, [1, 2], ref) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="channel 3"):
        expected_dice(probs, pred, [1, 3])


def test_expected_dice_qc_sign_and_error():
    per_case = {f"c{i}": {"dice": 0.9 - 0.05 * i, "expected_dice": 0.95 - 0.05 * i} for i in range(10)}
    q = expected_dice_qc(per_case, 0.1)
    assert q["spearman"] == pytest.approx(1.0)  # tracks the Dice: positive
    assert q["mean_abs_error"] == pytest.approx(0.05)
    assert q["worst_cases"] == ["c9"] and q["worst_auroc"] == 1.0


def _write(path, arr, spacing=(2.0, 1.0, 1.0)):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders(tmp_path):
    """Three cases: reference, prediction with known errors, an entropy map equal to the error mask plus a
    high value far from the structure (outside the scored region), a constant mutual-information map, and
    calibrated probabilities."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for i in range(3):
        ref = np.zeros((8, 24, 24), np.uint8)
        ref[2:6, 4:12, 4:12] = 1
        ref[2:6, 12:16, 4:12] = 2
        pred = ref.copy()
        pred[2:6, 4:4 + 2 * (i + 1), 4:8] = 2  # more errors in later cases
        err = pred != ref
        ent = err.astype(np.float32)
        ent[:, 22:, 22:] = 5.0  # far background, correct: only inside the region must this not count
        _write(ref_dir / f"c{i}.nii.gz", ref)
        _write(pred_dir / f"c{i}.nii.gz", pred)
        _write(pred_dir / f"c{i}_entropy.nii.gz", ent)
        _write(pred_dir / f"c{i}_mutual_info.nii.gz", np.full(ref.shape, 0.2, np.float32))
        probs = np.zeros((3, *ref.shape), np.float32)
        probs[pred, *np.indices(ref.shape)] = 1.0
        np.savez_compressed(pred_dir / f"c{i}.npz", probabilities=probs)
    return ref_dir, pred_dir, tmp_path


def test_command_scores_a_perfect_and_a_constant_map_side_by_side(folders):
    ref_dir, pred_dir, tmp = folders
    out = tmp / "report"
    proc = subprocess.run([CLI, "uncertainty", str(ref_dir), str(pred_dir), str(pred_dir), "-o", str(out),
                           "--map", "entropy", "mutual_info", "--names", "perfect", "constant"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rep = json.load(open(out / "report.json"))
    perfect, constant = rep["methods"]["perfect"], rep["methods"]["constant"]
    assert perfect["voxel"]["auroc"] == 1.0 and perfect["voxel"]["auprc"] == 1.0
    assert constant["voxel"]["auroc"] == 0.5
    assert constant["voxel"]["auprc"] == pytest.approx(constant["error_rate"])
    # one-hot probabilities of the prediction: confident and wrong on the errors
    cal = perfect["calibration"]
    assert cal["ece"] == pytest.approx(perfect["error_rate"], abs=1e-6)
    assert cal["brier"] == pytest.approx(2 * perfect["error_rate"], abs=1e-6)
    # more errors -> lower Dice and a higher mean entropy over the predicted foreground
    assert perfect["qc"]["spearman"] == pytest.approx(-1.0)
    # one-hot probabilities expect Dice 1 for every case: off by 1 - Dice
    dice = [v["dice"] for v in perfect["per_case"].values()]
    assert min(dice) < 1.0
    assert perfect["qc_expected_dice"]["mean_abs_error"] == pytest.approx(1.0 - np.mean(dice))
    assert constant["qc_expected_dice"]["mean_expected_dice"] == pytest.approx(1.0)
    assert "| perfect | entropy |" in open(out / "report.md").read()
    # the second method against the first, case by case: the constant map's AUROC is 0.5 in every case
    paired = rep["paired_vs_first"]["constant"]
    assert paired["auroc"]["n"] == 3 and paired["auroc"]["delta"] == pytest.approx(-0.5)
    assert "| constant | auroc | 3 | 0.5000 | 1.0000 | -0.5000 |" in open(out / "report.md").read()
    assert (out / "reliability.png").stat().st_size > 0


def test_paired_against_the_first_method_case_by_case():
    from scipy import stats

    from nnunet_diffusion.uncertainty import paired_against
    ref = [0.80, 0.90, 0.70, 0.85, 0.75]
    other = [0.86, 0.93, 0.74, 0.86, 0.80]
    first = {"per_case": {f"c{i}": {"auroc": r, "brier": 0.2, "dice": 0.8} for i, r in enumerate(ref)}}
    second = {"per_case": {f"c{i}": {"auroc": o, "brier": None if i == 0 else 0.1 + 0.01 * i, "dice": 0.8}
                           for i, o in enumerate(other)}}
    res = paired_against(first, second)
    d = np.subtract(other, ref)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))  # the paired t statistic by hand
    assert res["auroc"]["n"] == 5 and res["auroc"]["delta"] == pytest.approx(d.mean())
    assert res["auroc"]["mean"] == pytest.approx(np.mean(other))
    assert res["auroc"]["t_pvalue"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    # a case without a Brier score (no probabilities) is left out of that metric only
    assert res["brier"]["n"] == 4 and res["brier"]["delta"] == pytest.approx(np.mean([0.11, 0.12, 0.13, 0.14]) - 0.2)
    assert "auprc" not in res  # neither method has it
    assert res["dice"]["t_pvalue"] == 1.0  # identical per-case values


def test_margin_decides_what_is_scored(folders):
    from nnunet_diffusion.uncertainty import uncertainty_report
    ref_dir, pred_dir, tmp = folders
    wide = uncertainty_report(str(ref_dir), [str(pred_dir)], str(tmp / "wide"), ["entropy"], margin_mm=100)
    (r,) = wide["methods"].values()
    assert r["voxel"]["auroc"] < 1.0  # the far, correct, high-entropy voxels now count as false alarms


def test_entropy_of_saved_probabilities(folders):
    from nnunet_diffusion.uncertainty import uncertainty_report
    ref_dir, pred_dir, tmp = folders
    for i in range(3):  # probabilities 0.5/0.5 on the errors, one-hot elsewhere
        with np.load(pred_dir / f"c{i}.npz") as f:
            p = f["probabilities"]
        import SimpleITK as sitk
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_dir / f"c{i}.nii.gz")))
        err = p.argmax(0) != ref
        p[:, err] = 0
        p[1, err] = p[2, err] = 0.5
        np.savez_compressed(pred_dir / f"c{i}.npz", probabilities=p)
    rep = uncertainty_report(str(ref_dir), [str(pred_dir)], str(tmp / "p"), ["probabilities"])
    (r,) = rep["methods"].values()
    assert r["voxel"]["auroc"] == 1.0
    # confidence 0.5 on the error voxels (argmax picks class 1, the reference there: accuracy 1), confidence 1
    # and accuracy 1 elsewhere: ECE = error rate x |1 - 0.5|
    assert r["calibration"]["ece"] == pytest.approx(0.5 * r["error_rate"], abs=1e-6)


def test_missing_maps_fail_clearly_without_touching_the_output(folders):
    ref_dir, pred_dir, tmp = folders
    out = tmp / "keep"
    out.mkdir()
    (out / "report.md").write_text("previous")
    os.remove(pred_dir / "c1_entropy.nii.gz")
    proc = subprocess.run([CLI, "uncertainty", str(ref_dir), str(pred_dir), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "c1_entropy.nii.gz" in proc.stderr
    assert (out / "report.md").read_text() == "previous"
    proc = subprocess.run([CLI, "uncertainty", str(ref_dir), str(pred_dir), "-o", str(out), "--margin", "-1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--margin" in proc.stderr


def test_example_figure_shows_each_methods_errors_and_its_own_map(folders):
    """The figure's panels: the slice with the most reference foreground, errors = prediction != reference, the
    map from its file or, for a probabilities method, the entropy of its npz."""
    from nnunet_diffusion.uncertainty import case_panels, example_figure, method_cases
    ref_dir, pred_dir, tmp = folders
    image = np.zeros((8, 24, 24), np.float32)
    image[3] = 1.0
    _write(tmp / "c2_0000.nii.gz", image)
    ent, prob = method_cases(str(ref_dir), str(pred_dir), "entropy")["c2"], \
        method_cases(str(ref_dir), str(pred_dir), "probabilities")["c2"]
    panels = case_panels(str(tmp / "c2_0000.nii.gz"), [ent, prob])
    z = panels["slice"]
    assert z == 2  # slices 2-5 tie; the first with the most reference foreground
    ref = np.zeros((24, 24), np.uint8)
    ref[4:12, 4:12], ref[12:16, 4:12] = 1, 2
    pred = ref.copy()
    pred[4:10, 4:8] = 2
    assert (panels["reference"] == ref).all() and (panels["methods"][0]["prediction"] == pred).all()
    assert (panels["methods"][0]["errors"] == (pred != ref)).all()
    file_map = panels["methods"][0]["uncertainty"]
    assert (file_map[pred != ref] == 1).all() and file_map[23, 23] == 5.0  # the entropy file as written
    assert np.allclose(panels["methods"][1]["uncertainty"], 0, atol=1e-9)  # one-hot npz: entropy 0
    assert panels["image"][0, 0] == 0
    out = tmp / "example.png"
    assert example_figure(str(tmp / "c2_0000.nii.gz"), [ent, prob], ["a", "b"], str(out)) == z
    assert out.stat().st_size > 0
