"""Paper metrics against analytic shapes, empty masks, and the comparison report."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import stats

from conftest import BIN, run
from nnunet_diffusion.evaluation import binary_metrics, case_metrics


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_identical_masks():
    m = _cube((20, 20, 20), (5, 5, 5), (12, 14, 10))
    r = binary_metrics(m, m, (1.0, 2.0, 0.5))
    assert r == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0, "cd": 0.0}


@pytest.mark.parametrize("axis,spacing", [(0, (3.0, 1.0, 1.0)), (2, (1.0, 0.7, 2.5)), (1, (0.5, 0.5, 0.5))])
def test_shifted_cube_dice_and_centroid_in_mm(axis, spacing):
    lo, hi = [4, 4, 4], [14, 12, 10]
    ref = _cube((24, 24, 24), lo, hi)
    lo2, hi2 = list(lo), list(hi)
    lo2[axis] += 2
    hi2[axis] += 2
    pred = _cube((24, 24, 24), lo2, hi2)
    r = binary_metrics(pred, ref, spacing)
    n = hi[axis] - lo[axis]
    assert r["dice"] == pytest.approx((n - 2) / n)
    assert r["cd"] == pytest.approx(2 * spacing[axis])
    # the faces perpendicular to the shift are 2 voxels apart: that is the largest surface distance
    assert r["hd95"] <= 2 * spacing[axis] + 1e-9


def test_points_give_exact_distances_with_anisotropic_spacing():
    ref = np.zeros((10, 10, 10), bool)
    pred = np.zeros((10, 10, 10), bool)
    ref[2, 3, 4] = True
    pred[4, 3, 7] = True
    spacing = (2.0, 1.0, 0.5)
    d = math.hypot(2 * 2.0, 3 * 0.5)
    r = binary_metrics(pred, ref, spacing, tolerance_mm=d - 0.01)
    assert r["hd95"] == pytest.approx(d) and r["cd"] == pytest.approx(d) and r["nsd"] == 0.0
    assert binary_metrics(pred, ref, spacing, tolerance_mm=d + 0.01)["nsd"] == 1.0


def test_concentric_spheres_hd95_is_radius_difference():
    shape = (48, 48, 48)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    r = np.sqrt(((grid - 23.5) ** 2).sum(0))
    res = binary_metrics(r < 12, r < 16, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert abs(res["hd95"] - 4.0) <= 1.0
    assert res["cd"] == pytest.approx(0.0, abs=1e-9)
    assert res["dice"] == pytest.approx(2 * 12 ** 3 / (12 ** 3 + 16 ** 3), rel=0.05)
    assert res["nsd"] < 0.1  # surfaces are 4 mm apart everywhere, tolerance 1 mm
    # with 2 mm spacing along z the same voxel masks are 2x further apart along z
    aniso = binary_metrics(r < 12, r < 16, (2.0, 1.0, 1.0))
    assert aniso["hd95"] > res["hd95"]


def test_empty_masks():
    full = _cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    empty = np.zeros((8, 8, 8), bool)
    diag = math.sqrt(3) * 8
    assert binary_metrics(empty, empty, (1, 1, 1)) is None
    missed = binary_metrics(empty, full, (1, 1, 1))
    assert missed["dice"] == 0 and missed["nsd"] == 0 and missed["hd95"] == pytest.approx(diag)
    fp = binary_metrics(full, empty, (1, 1, 1))
    assert fp["dice"] == 0 and fp["cd"] == pytest.approx(diag)
    # case score: a class absent from both is left out; absent everywhere = perfect
    ref = np.zeros((8, 8, 8), int)
    ref[full] = 1
    res = case_metrics(ref.copy(), ref, (1, 1, 1), labels=[1, 2])
    assert res["classes"]["2"] is None and res["scored_classes"] == ["1"] and res["case"]["dice"] == 1.0
    res = case_metrics(np.zeros_like(ref), np.zeros_like(ref), (1, 1, 1), labels=[1, 2])
    assert res["case"] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0, "cd": 0.0}
    res = case_metrics(ref, np.zeros_like(ref), (1, 1, 1), labels=[1, 2])
    assert res["scored_classes"] == ["1"] and res["case"]["dice"] == 0.0
    assert all(np.isfinite(v) for v in res["case"].values())


def _write(arr, path, spacing):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    ref, a, b = (tmp_path / n for n in ("ref", "a", "b"))
    for f in (ref, a, b):
        f.mkdir()
    spacing = (2.0, 1.0, 1.0)
    for i in range(6):
        lab = np.zeros((12, 16, 16), np.uint8)
        lab[3:9, 4:10, 3:8] = 1
        lab[3:9, 4:10, 8:12] = 2  # narrower than class 1: a shift costs the two classes different Dice
        _write(lab, ref / f"c{i}.nii.gz", spacing)
        pa = np.roll(lab, int(rng.integers(0, 2)), axis=2)
        pb = np.roll(lab, int(rng.integers(1, 4)), axis=2)
        _write(pa, a / f"c{i}.nii.gz", spacing)
        _write(pb, b / f"c{i}.nii.gz", spacing)
    return ref, a, b


def test_evaluate_command_writes_per_case_per_class(folders, tmp_path):
    ref, a, _ = folders
    out = tmp_path / "e.json"
    run([f"{BIN}/nnunet-diffusion", "evaluate", str(ref), str(a), "-o", str(out), "-l", "1", "2"])
    res = json.load(open(out))
    assert set(res["cases"]) == {f"c{i}" for i in range(6)}
    for c in res["cases"].values():
        assert set(c["classes"]) == {"1", "2"}
        assert set(c["classes"]["1"]) == {"dice", "nsd", "hd95", "cd"}
    assert set(res["summary"]["case"]["dice"]) == {"mean", "std"}
    # Dice per case and class counted by hand from the files; the case score is the mean over the classes
    expected, differ = [], False
    for i in range(6):
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / f"c{i}.nii.gz")))
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(a / f"c{i}.nii.gz")))
        per = [2 * np.sum((r == c) & (p == c)) / (np.sum(r == c) + np.sum(p == c)) for c in (1, 2)]
        assert res["cases"][f"c{i}"]["classes"]["1"]["dice"] == pytest.approx(per[0])
        assert res["cases"][f"c{i}"]["classes"]["2"]["dice"] == pytest.approx(per[1])
        expected.append(np.mean(per))
        differ = differ or per[0] != pytest.approx(per[1])
    assert differ  # the data can tell a mean over classes from, e.g., a max    assert res["summary"]["case"]["dice"]["mean"] == pytest.approx(np.mean(expected))
    assert res["summary"]["case"]["dice"]["std"] == pytest.approx(np.std(expected))


def test_compare_writes_report_and_t_test_matches_scipy(folders, tmp_path):
    ref, a, b = folders
    out = tmp_path / "cmp"
    proc = run([f"{BIN}/nnunet-diffusion", "compare", str(a), str(b), "--labels", str(ref), "-o", str(out)])
    for f in ("report.md", "report.json", "per_class_dice.png"):
        assert (out / f).is_file()
    rep = json.load(open(out / "report.json"))
    da, db = rep["per_case_dice"]["a"], rep["per_case_dice"]["b"]
    assert rep["num_cases"] == 6 and len(da) == 6
    # paired t by its formula, the p-value from the t distribution with n - 1 degrees of freedom
    d = np.asarray(da) - np.asarray(db)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    p = 2 * stats.t.sf(abs(t), len(d) - 1)
    assert rep["tests"]["t_statistic"] == pytest.approx(t, rel=1e-9)
    assert rep["tests"]["t_pvalue"] == pytest.approx(p, rel=1e-9)
    # Wilcoxon signed-rank statistic by hand: the smaller of the rank sums of positive and negative differences
    ranks = stats.rankdata(np.abs(d))
    assert rep["tests"]["wilcoxon_statistic"] == pytest.approx(min(ranks[d > 0].sum(), ranks[d < 0].sum()))
    md = open(out / "report.md").read()
    assert f"t = {t:.3f}, p = {p:.4g}" in md
    significant = p < 0.01
    assert rep["significant"] == significant
    verdict = "the difference is significant" if significant else "no significant difference in Dice"
    assert verdict in md and verdict in proc.stdout


def test_bad_folder_gives_clear_error(tmp_path):
    proc = run([f"{BIN}/nnunet-diffusion", "evaluate", str(tmp_path / "nope"), str(tmp_path), "-o",
                str(tmp_path / "x.json")], check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    assert not (tmp_path / "x.json").exists()
