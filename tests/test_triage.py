"""Case triage without references: expected Dice and mean uncertainty against hand-computed values."""
import json
import math
import os

import numpy as np
import pytest

from nnunet_diffusion.triage import auroc, expected_dice, main, mean_uncertainty, triage_folder, triage_quality


def probs(fg):
    fg = np.asarray(fg, dtype=float)
    return np.stack([1 - fg, fg]).reshape(2, 1, len(fg))


def test_expected_dice_by_hand():
    # label map [1, 1, 0, 0]; sum P over it 1.7, its size 2, sum P 2.0 -> 2 * 1.7 / 4
    assert expected_dice(probs([0.9, 0.8, 0.3, 0.0])) == pytest.approx(0.85)
    assert expected_dice(probs([1, 1, 0, 0])) == pytest.approx(1.0)
    assert expected_dice(probs([0, 0, 0, 0])) == 1.0  # nothing predicted, nothing probable


def test_expected_dice_averages_foreground_classes():
    p = np.array([[0.0, 0.0, 1.0], [1.0, 0.4, 0.0], [0.0, 0.6, 0.0]]).reshape(3, 1, 3)
    # class 1: label [1, 2, 0] -> mask {0}: 2 * 1.0 / (1 + 1.4); class 2: mask {1}: 2 * 0.6 / (1 + 0.6)
    assert expected_dice(p) == pytest.approx((2 / 2.4 + 1.2 / 1.6) / 2)


def test_mean_uncertainty_by_hand():
    # background probabilities 0.1, 0.2, 0.7 are below 0.9; the certain background voxel is left out
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q))  # noqa: E731
    assert mean_uncertainty(probs([0.9, 0.8, 0.3, 0.0])) == pytest.approx((h(0.1) + h(0.2) + h(0.3)) / 3)
    assert mean_uncertainty(probs([0, 0, 0])) == 0.0


def test_auroc_by_hand():
    assert auroc([0.9, 0.1, 0.5], [True, False, False]) == 1.0
    assert auroc([0.1, 0.9, 0.5], [True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.1], [True, False, False]) == 0.75  # one tie counts half


def test_bad_probabilities_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        expected_dice(np.full((2, 3), 0.7))
    with pytest.raises(ValueError, match="no probability files"):
        triage_folder(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["-i", str(tmp_path / "missing")])
    assert e.value.code == 2


def test_folder_triage_and_its_quality(tmp_path):
    cases = {"a": [0.9, 0.8, 0.3, 0.0], "b": [1, 1, 0, 0], "c": [0.6, 0.55, 0.45, 0.4], "d": [1, 0.95, 0.05, 0]}
    for name, fg in cases.items():
        np.savez(tmp_path / f"{name}.npz", probabilities=probs(fg))
    rows = triage_folder(str(tmp_path))
    assert [r["case"] for r in rows][0] == "c"  # the least certain case first
    assert open(tmp_path / "triage.csv").read().splitlines()[0] == "case,expected_dice,mean_uncertainty"
    truth = {"a": 0.85, "b": 0.99, "c": 0.30, "d": 0.97}
    q = triage_quality(rows, truth, worst=0.25)
    assert q["worst_cases"] == 1 and q["auroc_worst"] == 1.0 and q["spearman_rho"] == pytest.approx(1.0)
    e = {r["case"]: r["expected_dice"] for r in rows}
    assert q["mae"] == pytest.approx(np.mean([abs(e[k] - truth[k]) for k in truth]))
    summary = {"metric_per_case": [{"prediction_file": f"/x/{k}.nii.gz", "metrics": {"1": {"Dice": v}}}
                                   for k, v in truth.items()]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["-i", str(tmp_path), "--summary", str(tmp_path / "summary.json"), "--quality-out",
                 str(tmp_path / "q.json")]) == 0
    written = json.load(open(tmp_path / "q.json"))  # the default worst 10 % of 4 cases: 1 case
    assert os.path.isfile(tmp_path / "triage.csv") and written["worst_cases"] == 1 and written["mae"] == q["mae"]
