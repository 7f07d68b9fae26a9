"""benchmarks/equal_time.py: methods of accuracy-study folders of different budgets against one reference."""
import json
import os
import sys

import pytest

import equal_time

CASES = [f"case_{i}" for i in range(6)]


def _folder(root, name, epochs, runs, fold_val=CASES):
    """An accuracy-study folder with ``runs`` = [(per-case Dice list, epoch seconds list)], the first the latest."""
    os.makedirs(root / name)
    entries = [{"trainer": f"M_{epochs}ep", "date": f"run {i}", "modes": {"mirror": dict(zip(CASES, d))},
                "training": {"epoch_times_s": t, "training_s": sum(t)}} for i, (d, t) in enumerate(runs)]
    acc = {"fold": 0, "budget": {"epochs": epochs, "iterations": 50, "batch_size": 2}, "machine": None,
           "methods": {"M": entries[0]}, "earlier_runs": {"M": entries[1:]}}
    json.dump(acc, open(root / name / "accuracy.json", "w"))
    json.dump([{"train": [], "val": list(fold_val)}], open(root / name / "splits_final.json", "w"))


def test_run_means_delta_and_the_least_disturbed_training_time(tmp_path):
    ref = [0.80, 0.82, 0.84, 0.86, 0.88, 0.90]
    _folder(tmp_path, "short", 4, [(ref, [10, 10, 10, 10])])
    # two runs: per-case mean = ref + 0.01 + 0.0/0.02 alternating; the second run shared the machine (slower)
    a = [x + 0.01 for x in ref]
    b = [x + 0.01 + (0.02 if i % 2 else 0.0) for i, x in enumerate(ref)]
    _folder(tmp_path, "long", 8, [(a, [20, 20, 21, 19, 20, 20, 20, 20]), (b, [40] * 8)])
    out = tmp_path / "out"
    equal_time.main(["-o", str(out), "--root", str(tmp_path), "--reference", "short:M", "--method", "long:M"])
    r = json.load(open(out / "equal_time.json"))
    c = r["comparisons"][0]
    assert c["runs"] == 2 and c["cases"] == 6
    assert c["delta"] == pytest.approx(0.01 + 0.01 / 2)
    assert c["epoch_s"] == 20 and c["training_s"] == 160 and r["reference"]["training_s"] == 40
    assert c["training_time_ratio"] == pytest.approx(4.0)
    assert "+0.0150" in open(out / "equal_time.md").read()


def test_another_split_is_refused(tmp_path):
    _folder(tmp_path, "a", 4, [([0.8] * 6, [1] * 4)])
    _folder(tmp_path, "b", 4, [([0.8] * 6, [1] * 4)], fold_val=CASES[::-1][:5])
    with pytest.raises(SystemExit, match="another fold or split"):
        equal_time.main(["-o", str(tmp_path / "o"), "--root", str(tmp_path), "--reference", "a:M", "--method", "b:M"])


def test_committed_runs_reproduce_the_accuracy_tables_over_all_runs_row(tmp_path):
    """Read through equal_time, the committed CPU runs give accuracy.md's row for the default's settings."""
    equal_time.main(["-o", str(tmp_path), "--reference", "accuracy_cpu_12x50:nnUNetTrainer",
                     "--method", "accuracy_cpu_12x50:DiffusionTrainer_noisePassSum"])
    c = json.load(open(tmp_path / "equal_time.json"))["comparisons"][0]
    md = open(os.path.join(equal_time.REPO_ROOT, "results", "Dataset004_Hippocampus", "accuracy_cpu_12x50",
                           "accuracy.md")).read()
    row = next(line for line in md.splitlines() if line.startswith("| DiffusionTrainer_noisePassSum | mirror, mean of 5 | 3 |"))
    assert f"| {c['dice_run_mean']:.4f} | {c['reference_dice_run_mean']:.4f} | {c['delta']:+.4f} | {c['p']:.2g} |" in row
