"""The accuracy study's tables (benchmarks/accuracy_protocol.py): a method trained several times is compared
through the per-case mean over all its runs, against the per-case mean over all stock runs."""
import json
import os
import sys

import numpy as np
import pytest



def _run(dice_mirror, dice_off, date):
    cases = [f"c{i}" for i in range(len(dice_mirror))]
    return {"trainer": "T", "date": date, "training": {"training_s": 1.0},
            "modes": {"mirror": dict(zip(cases, dice_mirror)), "off": dict(zip(cases, dice_off))}}


@pytest.fixture
def result():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.9, 12)
    stock = [_run(base + d, base + d - 0.01, f"s{i}") for i, d in enumerate((0.0, 0.02))]
    diff = [_run(base + d + rng.normal(0, 0.002, 12), base + d, f"d{i}") for i, d in enumerate((-0.02, 0.0, 0.01))]
    for r, name in [(stock[0], "nnUNetTrainer_12ep50it")] + [(r, "DiffusionTrainer_candidate_12ep50it") for r in diff]:
        r["trainer"] = name
    return {"dataset": "D", "configuration": "3d_fullres", "fold": 0, "num_cases": 12, "command": "c",
            "budget": {"epochs": 12, "iterations": 50, "batch_size": 2}, "device": "cpu",
            "machine": {"cpu": "x", "cpu_count": 2, "torch": "t", "nnunetv2": "n", "date_utc": "now"},
            "methods": {"nnUNetTrainer": stock[0], "DiffusionTrainer_candidate": diff[0]},
            "earlier_runs": {"nnUNetTrainer": stock[1:], "DiffusionTrainer_candidate": diff[1:]}}


def test_run_mean_averages_every_run_per_case(result):
    from accuracy_protocol import run_mean
    runs = [result["methods"]["DiffusionTrainer_candidate"]] + result["earlier_runs"]["DiffusionTrainer_candidate"]
    means = run_mean(result, "DiffusionTrainer_candidate")
    for mode in ("mirror", "off"):
        for c, v in means[mode].items():
            assert v == pytest.approx(np.mean([r["modes"][mode][c] for r in runs]))
    # a case one run lacks is left out (a mean over fewer runs would mix run noise into the comparison)
    del runs[1]["modes"]["off"]["c3"]
    assert "c3" not in run_mean(result, "DiffusionTrainer_candidate")["off"]
    assert "c3" in run_mean(result, "DiffusionTrainer_candidate")["mirror"]


def test_tables_compare_run_means(result, tmp_path):
    from accuracy_protocol import write_tables
    write_tables(result, str(tmp_path))
    text = (tmp_path / "accuracy.md").read_text()
    assert "except (runs): nnUNetTrainer 2, DiffusionTrainer_candidate 3." in text
    section = text.split("## Over all training runs")[1].split("\n## ")[0]
    row = [ln for ln in section.splitlines() if ln.startswith("| DiffusionTrainer_candidate | mirror |")][0].split(" | ")
    m = result["methods"]
    runs = [m["DiffusionTrainer_candidate"]] + result["earlier_runs"]["DiffusionTrainer_candidate"]
    stock = [m["nnUNetTrainer"]] + result["earlier_runs"]["nnUNetTrainer"]
    mean = lambda rs: np.mean([np.mean(list(r["modes"]["mirror"].values())) for r in rs])  # noqa: E731
    assert row[2] == "3"
    assert float(row[4]) == pytest.approx(mean(runs), abs=1e-4)
    assert float(row[5]) == pytest.approx(mean(stock), abs=1e-4)
    assert float(row[6]) == pytest.approx(mean(runs) - mean(stock), abs=1e-4)
    # the latest run alone would be 0.02 lower than the run mean: the table must not be that
    assert abs(float(row[4]) - np.mean(list(m["DiffusionTrainer_candidate"]["modes"]["mirror"].values()))) > 0.005


def test_every_run_of_a_method_is_compared_with_every_stock_run(result, tmp_path):
    """"Against every stock run and their mean": a method trained three times has a row per run and mode, each
    run's own Δ against each stock run (not the latest run's Δ repeated)."""
    from study_lib import paired, run_label
    from accuracy_protocol import write_tables
    for i, r in enumerate([result["methods"]["DiffusionTrainer_candidate"]] + result["earlier_runs"]["DiffusionTrainer_candidate"]):
        r["date"] = f"2026-11-2{i} 10:00 UTC"
    write_tables(result, str(tmp_path))
    section = (tmp_path / "accuracy.md").read_text().split("## Against every stock run")[1].split("\n## ")[0]
    stock = [result["methods"]["nnUNetTrainer"]] + result["earlier_runs"]["nnUNetTrainer"]
    runs = [result["methods"]["DiffusionTrainer_candidate"]] + result["earlier_runs"]["DiffusionTrainer_candidate"]
    for run in runs:
        row = [ln for ln in section.splitlines()
               if ln.startswith(f"| DiffusionTrainer_candidate, {run_label(run)} | mirror |")]
        assert len(row) == 1
        cells = row[0].split(" | ")
        for j, s in enumerate(stock):
            assert float(cells[3 + j].split()[0]) == pytest.approx(
                paired(run["modes"]["mirror"], s["modes"]["mirror"])[2], abs=1e-4)
    # a stock run validated with mirroring only: no cell for the unmirrored modes, the mean over the others
    del result["methods"]["nnUNetTrainer"]["modes"]["off"]
    write_tables(result, str(tmp_path))
    section = (tmp_path / "accuracy.md").read_text().split("## Against every stock run")[1].split("\n## ")[0]
    row = [ln for ln in section.splitlines() if ln.startswith(f"| DiffusionTrainer_candidate, {run_label(runs[1])} | off |")]
    cells = row[0].split(" | ")
    assert cells[3] == "–" and cells[-1].endswith("[1 runs] |")
    assert float(cells[-1].split()[0]) == pytest.approx(
        paired(runs[1]["modes"]["off"], stock[1]["modes"]["off"])[2], abs=1e-4)


def test_per_step_table_comes_from_the_newest_run_that_has_it(result, tmp_path):
    """A --validation-only rerun has no unmirrored predictions: the per-step table stays, from the earlier run."""
    from accuracy_protocol import write_tables
    earlier = result["earlier_runs"]["DiffusionTrainer_candidate"]
    earlier[0]["steps"] = {"step5": {"c0": 0.5}, "step1": {"c0": 0.7}}
    earlier[1]["steps"] = {"step5": {"c0": 0.1}, "step1": {"c0": 0.2}}
    write_tables(result, str(tmp_path))
    text = (tmp_path / "accuracy.md").read_text()
    section = text.split("## Per-step diagnosis: DiffusionTrainer_candidate_12ep50it (no mirroring, training run of d1)")[1]
    assert "| x0_hat of step5 | 0.5000 |" in section.split("\n## ")[0]
    assert "0.1000" not in text


def _log(path, epochs):
    """An nnU-Net training log (the lines nnU-Net 2.x writes each epoch) with the given (loss, dice1, dice2)."""
    with open(path, "w") as f:
        for i, (loss, d1, d2) in enumerate(epochs):
            f.write(f"2026-11-29 10:00:0{i}.000000: \n2026-11-29 10:00:0{i}.000001: Epoch {i} \n"
                    f"2026-11-29 10:00:0{i}.000002: train_loss {loss} \n"
                    f"2026-11-29 10:00:0{i}.000003: val_loss {loss + 0.1} \n"
                    f"2026-11-29 10:00:0{i}.000004: Pseudo dice [np.float32({d1}), np.float32({d2})] \n")


def test_training_dynamics_finds_when_both_classes_are_learned(result, tmp_path):
    from accuracy_protocol import training_dynamics, write_tables
    (tmp_path / "logs").mkdir()
    result["methods"]["nnUNetTrainer"]["date"] = "2026-11-29 10:00 UTC"
    result["earlier_runs"]["DiffusionTrainer_candidate"][0]["date"] = "2026-11-29 11:30 UTC"
    # stock: one class learned first (epoch 1), both at epoch 2; the diffusion run never learns the second class
    _log(tmp_path / "logs" / "nnUNetTrainer_12ep50it_training_log_2026_11_29_10_00_05.txt",
         [(0.2, 0.0, 0.0), (-0.1, 0.7, 0.1), (-0.5, 0.8, 0.65), (-0.7, 0.85, 0.8)])
    _log(tmp_path / "logs" / "DiffusionTrainer_candidate_12ep50it_training_log_2026_11_29_11_30_59.txt",
         [(0.2, 0.0, 0.0), (-0.3, 0.9, 0.2), (-0.4, 0.9, 0.5)])
    rows = {r["method"]: r for r in training_dynamics(result, str(tmp_path))}
    assert set(rows) == {"nnUNetTrainer", "DiffusionTrainer_candidate"}  # runs without a log are left out
    assert rows["nnUNetTrainer"]["escape_epoch"] == 2
    assert rows["nnUNetTrainer"]["min_class_pseudo_dice"] == [0.0, 0.1, 0.65, 0.8]
    assert rows["nnUNetTrainer"]["last_train_loss"] == -0.7
    assert rows["DiffusionTrainer_candidate"]["escape_epoch"] is None
    write_tables(result, str(tmp_path))
    section = (tmp_path / "accuracy.md").read_text().split("## Training dynamics")[1].split("\n## ")[0]
    assert "| DiffusionTrainer_candidate | 2026-11-29 11:30 UTC | never | 0.00 0.20 0.50 | -0.400 |" in section


def test_repeated_runs_are_recorded_once_newest_first(result, tmp_path):
    """--repeats: every run of a trainer is kept (the newest in methods, the others in earlier_runs), a run
    recorded before moves to earlier_runs, and recording the same runs again adds nothing."""
    import SimpleITK as sitk
    from accuracy_protocol import record_repeats
    gt = tmp_path / "gt"
    gt.mkdir()
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[1:3, 2:6, 2:4] = 1
    ref[1:3, 2:6, 4:6] = 2
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(gt / "c0.nii.gz"))
    runs = []
    for r, wrong in ((1, 0), (2, 4)):  # run 2 labels 4 voxels of class 1 as class 2
        fold_dir = tmp_path / f"run{r}" / "fold_0"
        (fold_dir / "validation").mkdir(parents=True)
        pred = ref.copy()
        pred[1, 2:2 + wrong, 2] = 2
        sitk.WriteImage(sitk.GetImageFromArray(pred), str(fold_dir / "validation" / "c0.nii.gz"))
        runs.append({"base": "DiffusionTrainer_candidate", "run": r, "trainer": "DiffusionTrainer_candidate_12ep50it",
                     "fold_dir": str(fold_dir), "command": "c", "epoch_times_s": [1.0, 2.0],
                     "training_log": f"DiffusionTrainer_candidate_12ep50it_training_log_2026_12_01_10_0{r}_00.txt"})
    before = result["methods"]["DiffusionTrainer_candidate"]
    n_earlier = len(result["earlier_runs"]["DiffusionTrainer_candidate"])
    record_repeats(result, runs, str(gt), "cmd")
    latest = result["methods"]["DiffusionTrainer_candidate"]
    assert latest["run"] == 2 and latest["date"] == "2026-12-01 10:02 UTC"
    assert latest["modes"]["mirror"]["c0"] < 1.0 and latest["training"]["training_s"] == 3.0
    earlier = result["earlier_runs"]["DiffusionTrainer_candidate"]
    assert len(earlier) == n_earlier + 2 and before in earlier
    assert earlier[-1]["run"] == 1 and earlier[-1]["modes"]["mirror"]["c0"] == 1.0
    record_repeats(result, runs, str(gt), "cmd")  # a resumed invocation: nothing new
    assert len(result["earlier_runs"]["DiffusionTrainer_candidate"]) == n_earlier + 2
    assert result["methods"]["DiffusionTrainer_candidate"] is latest


def _finished_run(root, run, trainer, log_name, epoch_s):
    fold_dir = root / "Dataset004_Hippocampus" / "accuracy_repeats" / f"run{run}" / "Dataset004_Hippocampus" / \
        f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    (fold_dir / "validation").mkdir(parents=True)
    (fold_dir / "validation" / "summary.json").write_text("{}")
    (fold_dir / log_name).write_text(f"2026-11-30 00:41:00.000000: Epoch time: {epoch_s} s\n")
    return fold_dir


def test_runs_started_in_the_same_second_keep_their_own_logs(tmp_path, monkeypatch):
    """Trainings side by side can start in the same second, and nnU-Net names its training log by that second:
    each run's copy in out/logs must still be its own (the training-dynamics table reads them)."""
    from accuracy_protocol import train_repeats
    monkeypatch.setattr("nnunetv2.paths.nnUNet_results", str(tmp_path / "res"))
    log_name = "training_log_2026_11_30_00_40_59.txt"
    for r, s in ((1, 3.0), (2, 7.0)):
        _finished_run(tmp_path / "res", r, "nnUNetTrainer_1ep2it", log_name, s)
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    runs = train_repeats(["nnUNetTrainer"], 1, 2, 2, 2, 0, "cpu", str(out), train=False)
    assert [r["epoch_times_s"] for r in runs] == [[3.0], [7.0]]
    assert runs[0]["training_log"] != runs[1]["training_log"]
    for r, s in zip(runs, (3.0, 7.0)):
        assert f"Epoch time: {s} s" in (out / "logs" / r["training_log"]).read_text()


def test_recording_without_training_skips_unfinished_runs(tmp_path, monkeypatch):
    """--record-only (after a DEADLINE): the finished runs are recorded, an unfinished one is left out (not
    trained), and with none finished there is nothing to record."""
    from accuracy_protocol import train_repeats
    monkeypatch.setattr("nnunetv2.paths.nnUNet_results", str(tmp_path / "res"))
    for r in (1, 2):
        fold_dir = _finished_run(tmp_path / "res", r, "nnUNetTrainer_1ep2it",
                                 f"training_log_2026_11_30_00_40_5{r}.txt", r)
    (fold_dir / "validation" / "summary.json").unlink()  # run 2 did not finish
    (tmp_path / "out" / "logs").mkdir(parents=True)
    runs = train_repeats(["nnUNetTrainer"], 1, 2, 2, 2, 0, "cpu", str(tmp_path / "out"), train=False)
    assert [r["run"] for r in runs] == [1]
    assert not (fold_dir / "checkpoint_latest.pth").exists()
    (tmp_path / "res" / "Dataset004_Hippocampus" / "accuracy_repeats" / "run1" / "Dataset004_Hippocampus" /
     "nnUNetTrainer_1ep2it__nnUNetPlans__3d_fullres" / "fold_0" / "validation" / "summary.json").unlink()
    with pytest.raises(RuntimeError, match="no finished run"):
        train_repeats(["nnUNetTrainer"], 1, 2, 2, 2, 0, "cpu", str(tmp_path / "out"), train=False)


def test_validation_dice_from_nnunet_summary_equals_the_segmentations(tmp_path):
    """A GPU run's files come back with nnU-Net's summary.json but without the segmentations: the Dice per case
    read from the summary is the one scored from the segmentations."""
    import shutil

    import SimpleITK as sitk
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from accuracy_protocol import validation_dice
    gt, pred = tmp_path / "gt", tmp_path / "validation"
    gt.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(1)
    for c in ("hippocampus_001", "hippocampus_017"):
        ref = np.zeros((6, 10, 10), np.uint8)
        ref[1:5, 2:8, 2:5] = 1
        ref[1:5, 2:8, 5:8] = 2
        noisy = ref.copy()
        flip = rng.random(ref.shape) < 0.15
        noisy[flip] = rng.integers(0, 3, flip.sum())
        for folder, arr in ((gt, ref), (pred, noisy)):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"{c}.nii.gz"))
    scored = validation_dice(str(pred), str(gt))
    compute_metrics_on_folder(str(gt), str(pred), str(pred / "summary.json"), SimpleITKIO(), ".nii.gz", [1, 2],
                              None, 1)
    shutil.move(str(pred), str(tmp_path / "kept"))
    pred.mkdir()
    shutil.copy(tmp_path / "kept" / "summary.json", pred / "summary.json")
    from_summary = validation_dice(str(pred), str(gt))
    assert set(from_summary) == set(scored) == {"hippocampus_001", "hippocampus_017"}
    for c in scored:
        assert 0.3 < scored[c] < 0.95
        assert from_summary[c] == pytest.approx(scored[c], abs=1e-12)


def test_candidates_are_compared_with_every_run_of_the_ema_default(result, tmp_path):
    """The EMA default was trained several times: a candidate's row holds its Δ against each of those runs
    (against one run alone it would be against that run's luck), and the default's own runs get no row."""
    from accuracy_protocol import write_tables
    rng = np.random.default_rng(1)
    default = "DiffusionTrainer_zeroInitChainMeanEma"
    runs = [_run(rng.uniform(0.6, 0.9, 12), rng.uniform(0.6, 0.9, 12), f"r{i}") for i in range(2)]
    for r in runs:
        r["trainer"] = f"{default}_12ep50it"
    result["methods"][default], result["earlier_runs"][default] = runs[0], runs[1:]
    write_tables(result, str(tmp_path))
    section = (tmp_path / "accuracy.md").read_text().split("## Candidates against the EMA default's")[1]
    section = section.split("\n## ")[0]
    assert not [ln for ln in section.splitlines() if ln.startswith(f"| {default} |")]
    row = [ln for ln in section.splitlines() if ln.startswith("| DiffusionTrainer_candidate | mirror |")][0]
    cells = row.strip("| ").split(" | ")[3:]
    cand = result["methods"]["DiffusionTrainer_candidate"]["modes"]["mirror"]
    assert len(cells) == len(runs)
    for cell, run in zip(cells, runs):
        ref = run["modes"]["mirror"]
        delta = np.mean([cand[c] - ref[c] for c in ref])
        assert float(cell.split(" ")[0]) == pytest.approx(delta, abs=1e-4)
        assert float(cell.split("(")[1].split(";")[0]) == pytest.approx(np.mean(list(ref.values())), abs=1e-4)


def test_a_recorded_split_is_kept_and_another_fold_is_refused(tmp_path):
    """Runs recorded in one results folder are compared case by case: the protocol keeps the split recorded
    there when the workspace's has gained other splits (same fold), and refuses a workspace whose fold differs."""
    import json

    from accuracy_protocol import record_split
    split = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}]
    workspace, out = tmp_path / "splits_final.json", tmp_path / "out"
    out.mkdir()
    workspace.write_text(json.dumps(split))
    record_split(str(workspace), str(out), 0)
    recorded = (out / "splits_final.json").read_text()
    workspace.write_text(json.dumps(split + [{"train": ["a", "b", "c"], "val": []}]))  # one more split, fold 0 same
    record_split(str(workspace), str(out), 0)
    assert (out / "splits_final.json").read_text() == recorded
    workspace.write_text(json.dumps([{"train": ["a", "c"], "val": ["b"]}] + split[1:]))
    with pytest.raises(SystemExit, match="fold 0"):
        record_split(str(workspace), str(out), 0)
    assert (out / "splits_final.json").read_text() == recorded


def test_per_step_table_gives_each_steps_paired_gain(result, tmp_path):
    """The per-step table's gains are paired over cases: each step against the step before and the first step."""
    from accuracy_protocol import write_tables
    from scipy import stats
    first, mid, last = {"c0": 0.5, "c1": 0.6, "c2": 0.7}, {"c0": 0.52, "c1": 0.6, "c2": 0.71}, \
        {"c0": 0.6, "c1": 0.59, "c2": 0.74}
    result["methods"]["DiffusionTrainer_candidate"]["steps"] = {"step3": first, "step2": mid, "step1": last}
    write_tables(result, str(tmp_path))
    rows = {line.split(" | ")[0]: line.split(" | ") for line in (tmp_path / "accuracy.md").read_text().splitlines()
            if line.startswith("| x0_hat of")}
    assert rows["| x0_hat of step3"][2:4] == ["–", "– |"]
    delta = lambda a, b: np.mean([a[c] - b[c] for c in a])  # noqa: E731
    p = stats.ttest_rel(list(last.values()), list(mid.values())).pvalue
    assert rows["| x0_hat of step1"][2] == f"{delta(last, mid):+.4f} ({p:.2g})"
    assert rows["| x0_hat of step1"][3].startswith(f"{delta(last, first):+.4f} (")
