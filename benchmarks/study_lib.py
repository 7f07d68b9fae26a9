"""Helpers the benchmark scripts share: the study's dataset, running nnU-Net's commands, Dice per case and paired
comparisons of per-case Dice.

The scripts in ``benchmarks/`` run as ``python benchmarks/SCRIPT.py`` (Python puts the script's folder on
``sys.path``, so ``from study_lib import ...`` needs nothing else); the tests import them through pytest's
``pythonpath`` (``pytest.ini``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET, DATASET_ID, CONFIG = "Dataset004_Hippocampus", "4", "3d_fullres"


def sh(cmd: List[str], log: str, env=None) -> None:
    """Run ``cmd``, appending the command line and its output to ``log``; a non-zero exit raises."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} failed ({rc}); see {log}")


def tool_path(name: str) -> str:
    """The console command ``name`` installed beside this interpreter (the project's own .venv), else ``name``."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.isfile(beside) else name


def prepare(batch_size: int, log: str) -> str:
    """Plan and preprocess the study's dataset (3d_fullres) if needed and set the planned batch size to
    ``batch_size`` (the same plans for every trainer); returns the plans file."""
    from nnunetv2.paths import nnUNet_preprocessed
    plans = os.path.join(str(nnUNet_preprocessed), DATASET, "nnUNetPlans.json")
    if not os.path.isfile(plans) or not os.path.isdir(os.path.join(str(nnUNet_preprocessed), DATASET,
                                                                   "nnUNetPlans_3d_fullres")):
        env = dict(os.environ)
        env.pop("nnUNet_n_proc_DA", None)  # 0 breaks plan_and_preprocess (torch.set_num_threads(0))
        sh([tool_path("nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "-c", CONFIG, "-np", "2"], log, env)
    p = json.load(open(plans))
    if p["configurations"][CONFIG]["batch_size"] != batch_size:
        p["configurations"][CONFIG]["batch_size"] = batch_size
        with open(plans, "w") as f:
            json.dump(p, f, indent=1)
    return plans


def val_images(fold: int, work: str) -> List[str]:
    """Links to the fold's validation images (nnU-Net's splits_final.json) in ``work/images``."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    splits = json.load(open(os.path.join(str(nnUNet_preprocessed), DATASET, "splits_final.json")))
    cases = sorted(splits[fold]["val"])
    folder = os.path.join(work, "images")
    os.makedirs(folder, exist_ok=True)
    for c in cases:
        dst = os.path.join(folder, f"{c}_0000.nii.gz")
        if not os.path.exists(dst):
            os.symlink(os.path.realpath(os.path.join(str(nnUNet_raw), DATASET, "imagesTr", f"{c}_0000.nii.gz")), dst)
    return cases


def summary_dice(summary_file: str) -> Dict[str, float]:
    """Per case, the mean over the labels of the Dice in an nnU-Net ``summary.json`` (its final validation)."""
    dice = {}
    for entry in json.load(open(summary_file))["metric_per_case"]:
        case = os.path.basename(entry["prediction_file"])
        case = case[:-len(".nii.gz")] if case.endswith(".nii.gz") else os.path.splitext(case)[0]
        dice[case] = float(np.mean([m["Dice"] for m in entry["metrics"].values()]))
    return dice


def paired(dice: Dict[str, float], ref: Dict[str, float]):
    """Mean of ``dice`` and ``ref`` over their common cases, the difference and the paired t-test's p."""
    from nnunet_diffusion.evaluation import paired_tests
    cs = sorted(set(dice) & set(ref))
    a, r = [dice[c] for c in cs], [ref[c] for c in cs]
    return np.mean(a), np.mean(r), np.mean(a) - np.mean(r), paired_tests(a, r)["t_pvalue"]


def case_mean(per_run: List[Dict[str, float]]) -> Dict[str, float]:
    """{case: mean Dice over ``per_run``} over the cases every run in ``per_run`` has."""
    cases = sorted(set(per_run[0]).intersection(*per_run[1:]))
    return {c: float(np.mean([d[c] for d in per_run])) for c in cases}


def run_label(entry: Dict, default: str = "earlier") -> str:
    """A training run's name in the tables: its start, and its number when --repeats trained it."""
    return entry.get("date", default) + (f" (run {entry['run']})" if "run" in entry else "")
