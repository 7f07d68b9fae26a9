"""benchmarks/gpu_equal_time_budgets.py: equal-time budgets from alone timings, and the report of the runs."""
import json
import os

import pytest

import gpu_equal_time_budgets as g

CASES = [f"hippocampus_{i:03d}" for i in range(6)]


def test_budgets_scale_stock_epochs_by_the_epoch_time_ratio():
    # stock 2 s per epoch at 50 epochs = 100 s: a trainer at 2.5 s gets 40 epochs, one at 3.9 s round(25.64) = 26
    b = g.equal_time_budgets({"nnUNetTrainer": 2.0, "Head": 2.5, "Default": 3.9}, 50, "nnUNetTrainer")
    assert b == {"nnUNetTrainer": 50, "Head": 40, "Default": 26}
    # a trainer far slower than stock still trains one epoch
    assert g.equal_time_budgets({"s": 1.0, "slow": 500.0}, 3, "s")["slow"] == 1


@pytest.mark.parametrize("times, epochs, ref, match", [
    ({"s": 1.0}, 0, "s", "at least 1"),
    ({"s": 1.0}, 5, "stock", "no epoch time for the reference"),
    ({"s": 1.0, "x": 0.0}, 5, "s", "must be positive"),
])
def test_budgets_refuse_bad_input(times, epochs, ref, match):
    with pytest.raises(ValueError, match=match):
        g.equal_time_budgets(times, epochs, ref)


def _summary(folder, dice):
    """An nnU-Net final-validation summary.json: per case, each label's Dice (two labels, the case's value)."""
    os.makedirs(folder)
    json.dump({"metric_per_case": [{"prediction_file": f"/x/{c}.nii.gz", "metrics": {"1": {"Dice": d}, "2": {"Dice": d}}}
                                   for c, d in zip(CASES, dice)]}, open(os.path.join(folder, "summary.json"), "w"))


def _method(root, base, epochs, runs):
    """An accuracy-protocol folder for ``base`` with ``runs`` = [(epoch times, {output: per-case Dice})], each run's
    fold folder holding validation/ (output "own") and validation_<output>/ summaries."""
    entries = []
    for i, (times, outputs) in enumerate(runs, 1):
        fold_dir = os.path.join(root, f"{base}_run{i}", "fold_0")
        for out, dice in outputs.items():
            _summary(os.path.join(fold_dir, "validation" if out == "own" else f"validation_{out}"), dice)
        entries.append({"run": i, "date": f"d{i}", "modes": {"mirror": dict(zip(CASES, outputs["own"]))},
                        "training": {"fold_dir": fold_dir, "epoch_times_s": times}})
    folder = os.path.join(root, f"acc_{base}")
    os.makedirs(folder)
    json.dump({"budget": {"epochs": epochs, "iterations": 100, "batch_size": 2}, "methods": {base: entries[-1]},
               "earlier_runs": {base: entries[:-1]}}, open(os.path.join(folder, "accuracy.json"), "w"))
    return folder


def test_report_realised_ratio_and_outputs_against_stock_and_trunk(tmp_path):
    stock = [0.80, 0.82, 0.84, 0.86, 0.88, 0.90]
    trunk = [x - 0.01 for x in stock]
    chain = [x + 0.02 * (i % 2) for i, x in enumerate(trunk)]  # ahead of the trunk by 0.01 on average
    mean = [x + 0.005 for x in stock]
    folders = {
        # stock: 10 epochs, median epoch 2 s (one slow epoch) -> 20 s
        "nnUNetTrainer": _method(str(tmp_path), "nnUNetTrainer", 10,
                                 [([2.0] * 9 + [9.0], {"own": stock}), ([2.0] * 10, {"own": stock})]),
        # head: 8 epochs at a median of 2.6 s -> 20.8 s, ratio 1.04 (equal time)
        "Head": _method(str(tmp_path), "Head", 8, [([2.6] * 8, {"own": mean, "trunk": trunk, "chain": chain})]),
        # slow: 4 epochs at 6 s -> 24 s, ratio 1.2 (not equal time)
        "Slow": _method(str(tmp_path), "Slow", 4, [([6.0] * 4, {"own": stock})]),
    }
    timing = {"reference": "nnUNetTrainer", "trainers": {}}
    r = g.build_report(timing, folders, "nnUNetTrainer")
    m = r["methods"]
    assert m["nnUNetTrainer"]["training_s"] == pytest.approx(20.0)
    assert m["Head"]["training_time_ratio"] == pytest.approx(20.8 / 20) and m["Head"]["equal_time"] is True
    assert m["Slow"]["training_time_ratio"] == pytest.approx(1.2) and m["Slow"]["equal_time"] is False
    assert [r_["sum_s"] for r_ in m["nnUNetTrainer"]["runs"]] == [20.0, 27.0]  # newest run first
    comps = {(c["output"], c["against"]): c for c in m["Head"]["comparisons"]}
    assert set(comps) == {("own", "stock"), ("trunk", "stock"), ("chain", "stock"), ("own", "trunk"),
                          ("chain", "trunk")}
    assert comps[("own", "stock")]["delta"] == pytest.approx(0.005)
    assert comps[("trunk", "stock")]["delta"] == pytest.approx(-0.01)
    assert comps[("chain", "trunk")]["delta"] == pytest.approx(0.01)
    assert comps[("own", "trunk")]["delta"] == pytest.approx(0.015)


def test_stock_epochs_lowered_only_where_they_would_not_fit():
    # 400 s left, 190 s reserved: 210 s / 4.4 s = 47.7 -> 47 epochs instead of 50
    assert g.epochs_that_fit(50, 400, 190, 4.4) == 47
    assert g.epochs_that_fit(50, 1000, 190, 4.4) == 50  # enough time: as asked
    assert g.epochs_that_fit(50, 100, 190, 4.4) == 1  # past the deadline already: one epoch, not none
    with pytest.raises(ValueError, match="must be positive"):
        g.epochs_that_fit(50, 400, 190, 0)
