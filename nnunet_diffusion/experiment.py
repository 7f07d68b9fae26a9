"""``nnunet-diffusion experiment table1|table2``: the paper's experiments under one training budget.

table1: nnUNetTrainer and DiffusionTrainer, in 2d and 3d_fullres (paper Table 1).
table2: DiffusionTrainer and its four ablations in 3d_fullres (paper Table 2).
Both use ``DiffusionTrainer``, the project's default (the paper's method with zero-initialised noisy-mask input
weights); each table records the diffusion settings of every trainer it ran. The paper's exact configuration is
``DiffusionTrainer_paper``.

Every run is ``nnUNetv2_train D C F -tr <Trainer>_<E>ep<I>it`` (the same budget for all), so results
live in nnU-Net's usual folders. A run whose fold has ``checkpoint_final.pth`` and a validation summary
is skipped; one with a ``checkpoint_latest.pth`` is continued with ``--c``. With ``jobs > 1`` that many
runs train at the same time (one GPU with memory to spare, or several CPU cores); the budget, not the
wall time, is what the runs share, so this changes no result. ``timings.json`` records each run's
wall time (``runs``), the training phase's (``training_s``) and the reports' (``reports_s``). The
comparisons are written with :func:`nnunet_diffusion.evaluation.compare` against nnU-Net's
``gt_segmentations``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

from nnunet_diffusion.config import DiffusionConfig

TABLES: Dict[str, List[Tuple[str, str]]] = {
    "table1": [("nnUNetTrainer", "2d"), ("DiffusionTrainer", "2d"),
               ("nnUNetTrainer", "3d_fullres"), ("DiffusionTrainer", "3d_fullres")],
    "table2": [("DiffusionTrainer", "3d_fullres"), ("DiffusionTrainer_noRecycle", "3d_fullres"),
               ("DiffusionTrainer_noDice", "3d_fullres"), ("DiffusionTrainer_predictNoise", "3d_fullres"),
               ("DiffusionTrainer_1000steps", "3d_fullres")],
}
# (A, B) pairs compared in each table: A is the method, B the reference
COMPARISONS: Dict[str, List[Tuple[str, str, str]]] = {
    "table1": [("DiffusionTrainer", "nnUNetTrainer", "2d"), ("DiffusionTrainer", "nnUNetTrainer", "3d_fullres")],
    "table2": [(v, "DiffusionTrainer", "3d_fullres") for v in
               ("DiffusionTrainer_noRecycle", "DiffusionTrainer_noDice", "DiffusionTrainer_predictNoise",
                "DiffusionTrainer_1000steps")],
}


def _fold_done(fold_dir: str) -> bool:
    return os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")) and \
        os.path.isfile(os.path.join(fold_dir, "validation", "summary.json"))


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def training_env(base, device: str) -> dict:
    """Environment for the nnUNetv2_train runs: the caller's values win; otherwise nnUNet_extTrainer points
    at the installed trainers folder, and on CPU data augmentation runs in-process without compile."""
    env = dict(base)
    if "nnUNet_extTrainer" not in env:  # only then: a checkout used in place has no installed trainers package
        from nnunet_diffusion.options import trainers_path
        env["nnUNet_extTrainer"] = trainers_path()
    env.setdefault("nnUNet_n_proc_DA", "0" if device == "cpu" else "8")
    env.setdefault("nnUNet_compile", "f" if device == "cpu" else "t")
    return env


def _train_command() -> str:
    """nnUNetv2_train beside this interpreter (a venv), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    found = beside if os.path.isfile(beside) else shutil.which("nnUNetv2_train")
    if found is None:
        raise RuntimeError("nnUNetv2_train was not found beside this Python nor on PATH; is nnunetv2 installed?")
    return found


def _train(cmd: List[str], env: dict, label: str, epochs: int, log_path: str) -> float:
    """Run nnUNetv2_train, log everything to a file, print one progress line per epoch; returns seconds."""
    start = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = None
        for line in proc.stdout:
            log.write(line)
            m = re.search(r"Epoch (\d+)\s*$", line)
            if m:
                epoch = int(m.group(1))
                first = epoch if first is None else first
                done = epoch - first
                elapsed = time.time() - start
                left = f", ~{elapsed / done * (epochs - epoch) / 60:.1f} min left in this run" if done else ""
                print(f"  {label}: epoch {epoch + 1}/{epochs}, {elapsed / 60:.1f} min elapsed{left}", flush=True)
            elif "Validation complete" in line or "Mean Validation Dice" in line:
                print(f"  {label}: {line.strip().split(': ', 1)[-1]}", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}; see {log_path}")
    return time.time() - start


def run_experiment(table: str, dataset: str, folds: Sequence[int], budget: Tuple[int, int], device: str,
                   out_dir: str, jobs: int = 1, plans_identifier: str = "nnUNetPlans") -> Dict:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_diffusion.budget import budget_name
    from nnunet_diffusion.evaluation import compare

    if table not in TABLES:
        raise ValueError(f"table must be one of {sorted(TABLES)}, got {table!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    name = maybe_convert_to_dataset_name(dataset)
    epochs, iters = budget
    plans = os.path.join(str(nnUNet_preprocessed), name, f"{plans_identifier}.json")
    if not os.path.isfile(plans):
        raise ValueError(f"{name} has no plans {plans_identifier!r} ({plans}): run nnUNetv2_plan_and_preprocess "
                         f"-d {dataset} -c 2d 3d_fullres (for other plans, with its -pl / -overwrite_plans_name)")
    configs = json.load(open(plans))["configurations"]
    missing = sorted({c for _, c in TABLES[table]} - set(configs))
    if missing:
        raise ValueError(f"{name} has no plans for {missing}")
    os.makedirs(out_dir, exist_ok=True)
    env = training_env(os.environ, device)
    train_bin = _train_command()
    runs = [(tr, cfg, f) for tr, cfg in TABLES[table] for f in folds]
    timings_path = os.path.join(out_dir, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    timings.setdefault("runs", {})
    lock = threading.Lock()
    t0 = time.time()

    def one(i: int, tr: str, cfg: str, fold: int) -> None:
        trainer = budget_name(tr, epochs, iters)
        fold_dir = os.path.join(str(nnUNet_results), name, f"{trainer}__{plans_identifier}__{cfg}", f"fold_{fold}")
        label = f"[run {i}/{len(runs)}] {trainer} {cfg} fold {fold}"
        key = f"{trainer}__{cfg}__fold_{fold}"  # names the log file and the timings entry
        if _fold_done(fold_dir):
            print(f"{label}: finished earlier, skipped", flush=True)
            return
        cmd = [train_bin, dataset, cfg, str(fold), "-tr", trainer, "-p", plans_identifier, "-device", device]
        if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")) or \
                os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
            cmd.append("--c")
            print(f"{label}: continuing from its last checkpoint", flush=True)
        else:
            print(f"{label}: training ({time.time() - t0:.0f} s into the experiment)", flush=True)
        seconds = _train(cmd, env, label, epochs, os.path.join(out_dir, f"{key}.log"))
        print(f"{label}: done in {seconds / 60:.1f} min", flush=True)
        with lock:
            timings["runs"][key] = round(seconds, 1)
            _write_json(timings_path, timings)

    if jobs == 1:
        for i, run in enumerate(runs, 1):
            one(i, *run)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, i, *run) for i, run in enumerate(runs, 1)]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # every run got its chance; report the first failure
            raise errors[0]
    timings["training_s"] = round(time.time() - t0, 1)
    t_reports = time.time()

    gt = os.path.join(str(nnUNet_preprocessed), name, "gt_segmentations")
    reports = {}
    for a, b, cfg in COMPARISONS[table]:
        folder = lambda tr: os.path.join(str(nnUNet_results), name,  # noqa: E731
                                         f"{budget_name(tr, epochs, iters)}__{plans_identifier}__{cfg}")
        dest = os.path.join(out_dir, f"{a}_vs_{b}_{cfg}")
        reports[f"{a} vs {b} ({cfg})"] = compare(folder(a), folder(b), gt, dest, names=[a, b])
        print(f"{a} vs {b} ({cfg}): {reports[f'{a} vs {b} ({cfg})']['verdict']}", flush=True)
    timings["reports_s"] = round(time.time() - t_reports, 1)
    _write_json(timings_path, timings)
    summary = write_table(table, reports, out_dir, budget, folds, device)
    print(f"wrote {summary}", flush=True)
    return reports


def write_table(table: str, reports: Dict, out_dir: str, budget, folds, device: str) -> str:
    rows, seen = [], set()
    for key, rep in reports.items():
        cfg = key.rsplit("(", 1)[1].rstrip(")")
        for method, s in rep["summary"].items():
            if (method, cfg) in seen:
                continue
            seen.add((method, cfg))
            c = s["case"]
            rows.append(f"| {method} | {cfg} | " + " | ".join(f"{c[m]['mean']:.3f} ({c[m]['std']:.3f})"
                                                             for m in ("dice", "nsd", "hd95", "cd")) + " |")
    tests = [f"* {k}: paired t-test p = {r['tests']['t_pvalue']:.3g}, Wilcoxon p = "
             f"{r['tests']['wilcoxon_pvalue']:.3g} ({r['num_cases']} cases) — {r['verdict']}" for k, r in reports.items()]
    from nnunet_diffusion.budget import _find_base
    settings = []
    for method in sorted({m for m, _ in seen}):
        cfg = getattr(_find_base(method), "diffusion", None)
        if cfg is not None:
            changed = {k: v for k, v in cfg.to_dict().items() if v != DiffusionConfig().to_dict()[k]}
            settings.append(f"* {method}: the paper's configuration" + (f" with {changed}" if changed else ""))
    text = "\n".join([f"# {table}: budget {budget[0]} epochs x {budget[1]} iterations, folds {list(folds)}, {device}",
                      "", "| method | configuration | DS | NSD | HD95 (mm) | CD (mm) |", "|---|---|---|---|---|---|",
                      *rows, "", *tests, "", "Diffusion settings:", *settings, ""])
    path = os.path.join(out_dir, f"{table}.md")
    with open(path, "w") as f:
        f.write(text)
    return path
