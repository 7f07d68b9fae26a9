"""What the EMA of the weights does, paired on each training run (accuracy issue, item 2.2).

A trainer with ``ema_halflife`` > 0 keeps its trained weights beside their moving average, and the average never
feeds back into training: one run answers both "with EMA" and "without EMA", on the same cases and noise, free of
the training-to-training spread. ``benchmarks/sampling_study.py`` predicts each run both ways (a setting and the
same setting ending in ``:raw``, i.e. ``nnUNetv2_predict_diffusion --weights raw``); this script collects those
pairs from the study folders:

    python benchmarks/ema_summary.py results/Dataset004_Hippocampus/ema_study_cpu_12x50 \\
        --group diffusion=default_run5,chainRecycle,scaledMaskInput,zeroStart --group control=imageOnly_run1,imageOnly_run2

Per run and setting: Dice with the average and with the trained weights, Δ = trained − average and the paired
t-test over the cases. Per group (runs of several trainings): for each case the mean Δ over the group's runs
(one setting per run: the first paired one, i.e. the prediction tool's default mirroring), then a one-sample
t-test of those per-case means against 0 over the cases, and how many runs' Δ are positive. Writes ``ema.json``
and ``ema.md`` into the folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np
from scipy import stats


def pairs(sampling: Dict) -> List[Dict]:
    """Every setting S of a sampling.json that also has S:raw: both Dice, Δ (raw − average), p, per-case Δ."""
    rows = sampling["rows"]
    found = []
    for name, row in rows.items():
        raw = rows.get(f"{name}:raw")
        if raw is None or name.endswith(":raw"):
            continue
        cases = sorted(set(row["per_case"]) & set(raw["per_case"]))
        delta = np.array([raw["per_case"][c] - row["per_case"][c] for c in cases])
        p = float(stats.ttest_1samp(delta, 0.0).pvalue) if np.any(delta != 0) else 1.0
        found.append({"setting": name, "average": float(np.mean([row["per_case"][c] for c in cases])),
                      "raw": float(np.mean([raw["per_case"][c] for c in cases])), "delta": float(delta.mean()),
                      "p": p, "cases": len(cases), "per_case_delta": dict(zip(cases, delta.tolist()))})
    return found


def group_test(runs: Dict[str, List[Dict]]) -> Dict:
    """Per case, the mean Δ over the runs (each run's first pair), t-tested against 0 over the cases."""
    firsts = {name: p[0] for name, p in runs.items() if p}
    if not firsts:
        return {}
    cases = sorted(set.intersection(*(set(p["per_case_delta"]) for p in firsts.values())))
    mean = np.array([np.mean([p["per_case_delta"][c] for p in firsts.values()]) for c in cases])
    return {"runs": len(firsts), "settings": {n: p["setting"] for n, p in firsts.items()},
            "delta": float(mean.mean()), "p": float(stats.ttest_1samp(mean, 0.0).pvalue), "cases": len(cases),
            "positive_runs": sum(p["delta"] > 0 for p in firsts.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="folder holding one sampling_study output folder per training run")
    ap.add_argument("--group", action="append", default=[], metavar="NAME=RUN,RUN,...",
                    help="runs (subfolder names) pooled in one test; repeatable")
    args = ap.parse_args(argv)
    runs: Dict[str, Dict] = {}
    for name in sorted(os.listdir(args.folder)):
        path = os.path.join(args.folder, name, "sampling.json")
        if os.path.isfile(path):
            sampling = json.load(open(path))
            runs[name] = {"trainer": sampling["trainer"], "machine": sampling.get("machine"),
                          "command": sampling.get("command"), "pairs": pairs(sampling)}
    if not runs:
        ap.error(f"no <run>/sampling.json in {args.folder}")
    groups = {}
    for g in args.group:
        name, _, members = g.partition("=")
        members = [m for m in members.split(",") if m]
        missing = [m for m in members if m not in runs]
        if not name or not members or missing:
            ap.error(f"--group {g!r}: expected NAME=RUN,RUN,... with runs among {sorted(runs)}"
                     + (f" (missing {missing})" if missing else ""))
        groups[name] = dict(group_test({m: runs[m]["pairs"] for m in members}), members=members)
    result = {"runs": runs, "groups": groups,
              "command": "python benchmarks/ema_summary.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with open(os.path.join(args.folder, "ema.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["# The EMA of the weights against the trained weights, paired on each training run", "",
             f"Command: `{result['command']}`; each run's predictions: `<run>/sampling.md` (machine, versions, "
             "date, the prediction commands).", "",
             "| run | trainer | setting | Dice, average | Dice, trained weights | Δ trained − average | p |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for p in run["pairs"]:
            lines.append(f"| {name} | {run['trainer']} | {p['setting']} | {p['average']:.4f} | {p['raw']:.4f} | "
                         f"{p['delta']:+.4f} | {p['p']:.2g} |")
    if groups:
        lines += ["", "Pooled per group: per case the mean Δ over the group's runs (each run's first setting), "
                  "t-test against 0 over the cases.", "",
                  "| group | runs | runs with Δ > 0 | mean Δ trained − average | p |", "|---|---|---|---|---|"]
        for name, g in groups.items():
            if g.get("runs"):
                lines.append(f"| {name} ({', '.join(g['members'])}) | {g['runs']} | {g['positive_runs']} | "
                             f"{g['delta']:+.4f} | {g['p']:.2g} |")
    with open(os.path.join(args.folder, "ema.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
