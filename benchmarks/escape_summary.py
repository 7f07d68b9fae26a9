"""How often training runs learn late, per group of trainers, across accuracy-study folders (accuracy issue).

At 12 x 50 iterations every trainer first labels the hippocampus as mostly one class and only later separates
the two; when that happens (the *escape epoch*, ``accuracy_protocol.escape_epoch``: the first epoch whose nnU-Net
pseudo Dice reaches 0.6 for every foreground class) decides much of a run's Dice. This script pools the training
runs of several accuracy-study folders (each with ``accuracy.json`` and the nnU-Net training logs under ``logs/``,
as ``benchmarks/accuracy_protocol.py`` writes them) into groups of trainers and reports per group:

* the runs that were late (escape epoch >= ``--late``, or never) and Fisher's exact test of that count against
  the first group's;
* the mean Dice (nnU-Net's final validation, default mirroring) of the runs that were on time, and Welch's t-test
  of those run Dice against the first group's (runs are the units: this sees the training-to-training spread that
  a paired test over the cases of two single runs cannot).

    python benchmarks/escape_summary.py -o results/Dataset004_Hippocampus/escape_summary_12x50 \\
        results/Dataset004_Hippocampus/accuracy_cpu_12x50 results/Dataset004_Hippocampus/accuracy_gpu_12x50 \\
        --group stock=nnUNetTrainer --group diffusion=DiffusionTrainer,accuracy_cpu_12x50:DiffusionTrainer_paper

A member is a method name (its runs in every folder) or ``FOLDER:method`` (only that folder's runs; FOLDER is
the folder's base name). Writes ``escape.json`` and ``escape.md`` into the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_protocol import training_dynamics  # noqa: E402


def collect_runs(folders: List[str]) -> List[Dict]:
    """Every training run with a log in the folders: folder base name, method, date, escape epoch, Dice."""
    runs = []
    for folder in folders:
        path = os.path.join(folder, "accuracy.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found: expected an accuracy-study folder "
                             f"(benchmarks/accuracy_protocol.py -o FOLDER)")
        result = json.load(open(path))
        source = os.path.basename(os.path.normpath(folder))
        for row in training_dynamics(result, folder):
            runs.append({"folder": source, "method": row["method"], "date": row["date"],
                         "escape_epoch": row["escape_epoch"], "dice": row["dice"]})
    return runs


def is_late(run: Dict, late: int) -> bool:
    return run["escape_epoch"] is None or run["escape_epoch"] >= late


def summarise(members: List[Dict], late: int) -> Dict:
    on_time = [r["dice"] for r in members if not is_late(r, late) and r["dice"] is not None]
    return {"runs": len(members), "late": sum(is_late(r, late) for r in members),
            "on_time_dice": on_time, "on_time_mean": float(np.mean(on_time)) if on_time else None,
            "all_mean": float(np.mean([r["dice"] for r in members if r["dice"] is not None])) if members else None}


def compare(group: Dict, reference: Dict) -> Dict:
    """Fisher's exact test of the late counts and Welch's t-test of the on-time run Dice, against ``reference``."""
    table = [[group["late"], group["runs"] - group["late"]], [reference["late"], reference["runs"] - reference["late"]]]
    out = {"fisher_p": float(stats.fisher_exact(table).pvalue)}
    a, b = group["on_time_dice"], reference["on_time_dice"]
    if len(a) > 1 and len(b) > 1:
        out["on_time_delta"] = float(np.mean(a) - np.mean(b))
        out["welch_p"] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="accuracy-study folders (accuracy.json and logs/)")
    ap.add_argument("-o", "--output", required=True, help="folder for escape.json and escape.md")
    ap.add_argument("--group", action="append", default=[], required=True, metavar="NAME=MEMBER,MEMBER,...",
                    help="trainers pooled in one group (the first group is the reference); repeatable")
    ap.add_argument("--late", type=int, default=6, help="a run is late when its escape epoch is at least this, or "
                                                        "it never escapes (default 6: every stock run so far escaped "
                                                        "by epoch 4)")
    args = ap.parse_args(argv)
    runs = collect_runs(args.folders)
    groups: Dict[str, Dict] = {}
    for g in args.group:
        name, _, spec = g.partition("=")
        wanted = [m for m in spec.split(",") if m]
        if not name or not wanted:
            ap.error(f"--group {g!r}: expected NAME=MEMBER,MEMBER,...")
        members, missing = [], []
        for m in wanted:
            folder, _, method = m.rpartition(":")
            found = [r for r in runs if r["method"] == method and (not folder or r["folder"] == folder)]
            if found:
                members.extend(found)
            else:
                missing.append(m)
        if missing:
            ap.error(f"--group {name}: no training run of {missing} in {args.folders}")
        groups[name] = dict(summarise(members, args.late), members=wanted, run_list=members)
    reference = next(iter(groups))
    for name, g in groups.items():
        if name != reference:
            g.update(compare(g, groups[reference]))
    command = "python benchmarks/escape_summary.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "escape.json"), "w") as f:
        json.dump({"command": command, "late": args.late, "groups": groups}, f, indent=1)

    def fmt(x, spec):
        return "–" if x is None else format(x, spec)
    lines = ["# Late training runs per group of trainers", "",
             f"Command: `{command}`. From each folder's `accuracy.json` and nnU-Net training logs (machine, versions "
             f"and dates: each folder's `accuracy.md`). Late: escape epoch >= {args.late} or never. Tests against "
             f"the first group ({reference}): Fisher's exact test of the late counts; Welch's t-test of the on-time "
             f"runs' Dice (one value per run).", "",
             "| group | runs | late | Dice of the on-time runs (mean) | Dice of all runs (mean) | Δ on-time vs "
             f"{reference} (Welch p) | late vs {reference} (Fisher p) |", "|---|---|---|---|---|---|---|"]
    for name, g in groups.items():
        delta = (f"{g['on_time_delta']:+.4f} ({g['welch_p']:.2g})" if "on_time_delta" in g else "–")
        lines.append(f"| {name} | {g['runs']} | {g['late']} | {fmt(g['on_time_mean'], '.4f')} | "
                     f"{fmt(g['all_mean'], '.4f')} | {delta} | {fmt(g.get('fisher_p'), '.2g')} |")
    lines += ["", "| group | folder | method | run | escape epoch | Dice |", "|---|---|---|---|---|---|"]
    for name, g in groups.items():
        for r in g["run_list"]:
            lines.append(f"| {name} | {r['folder']} | {r['method']} | {r['date']} | "
                         f"{'never' if r['escape_epoch'] is None else r['escape_epoch']} | {fmt(r['dice'], '.4f')} |")
    with open(os.path.join(args.output, "escape.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
