"""Methods compared across accuracy-study folders of different budgets: e.g. stock nnU-Net trained for as long
(in wall-clock time) as the diffusion model, against the diffusion model at its iteration budget.

    python benchmarks/equal_time.py -o results/Dataset004_Hippocampus/equal_time_cpu \\
        --reference accuracy_cpu_12x50:DiffusionTrainer_noisePassSum \\
        --method accuracy_cpu_12x100_stock:nnUNetTrainer --method accuracy_cpu_12x50:nnUNetTrainer

Each ``FOLDER:METHOD`` is a method of an accuracy-study folder (``benchmarks/accuracy_protocol.py`` writes its
``accuracy.json``; FOLDER is a path, or a base name under ``--root``), with every training run recorded there
(the run in ``methods`` and its ``earlier_runs``). For each method: its budget, the Dice of each run, the
per-case mean over its runs and its training time, the least disturbed run's: the lowest median epoch time over
its runs (nnU-Net's epoch times) times the budget's epochs; then each method against the reference: Δ of the
per-case run means and the paired t-test over the cases every run has, and the ratio of the training times
(method over reference). ``--mode`` picks the validation mode (default
``mirror``: nnU-Net's final validation with its default mirroring). The folders must record the same fold and
split. Writes ``equal_time.json`` and ``equal_time.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict

import numpy as np

from study_lib import REPO_ROOT, case_mean, paired, run_label


def load_method(spec: str, root: str, mode: str) -> Dict:
    """Every recorded run of ``FOLDER:METHOD``: folder, budget, split, and per run its Dice per case and seconds."""
    if ":" not in spec:
        raise SystemExit(f"{spec!r}: expected FOLDER:METHOD, e.g. accuracy_cpu_12x50:nnUNetTrainer")
    folder, method = spec.rsplit(":", 1)
    path = folder if os.path.isdir(folder) else os.path.join(root, folder)
    acc_file = os.path.join(path, "accuracy.json")
    if not os.path.isfile(acc_file):
        raise SystemExit(f"{spec}: no accuracy.json in {path}")
    acc = json.load(open(acc_file))
    latest = acc["methods"].get(method)
    if latest is None:
        raise SystemExit(f"{spec}: no method {method!r} in {acc_file} (it has: {', '.join(acc['methods'])})")
    runs = []
    for entry in [latest] + acc.get("earlier_runs", {}).get(method, []):
        if mode not in entry.get("modes", {}):
            continue
        dice = entry["modes"][mode]
        epochs = entry.get("training", {}).get("epoch_times_s") or []
        runs.append({"run": run_label(entry), "dice": dice, "mean_dice": float(np.mean(list(dice.values()))),
                     "training_s": entry.get("training", {}).get("training_s"),
                     "median_epoch_s": float(np.median(epochs)) if epochs else None})
    if not runs:
        raise SystemExit(f"{spec}: no run validated in mode {mode!r}")
    split = None
    split_file = os.path.join(path, "splits_final.json")
    if os.path.isfile(split_file):
        split = sorted(json.load(open(split_file))[acc["fold"]]["val"])
    return {"spec": spec, "folder": os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT) else path,
            "method": method, "budget": acc["budget"], "fold": acc["fold"], "machine": acc.get("machine"),
            "split_val": split, "runs": runs}


def summarise(entry: Dict) -> Dict:
    """Per-case mean Dice over the runs, and the training time of the least disturbed run: the lowest median
    epoch time over the runs (runs that shared the cores with other work are slower, never faster), times the
    epochs of the budget."""
    medians = [r["median_epoch_s"] for r in entry["runs"] if r["median_epoch_s"]]
    epoch_s = min(medians) if medians else None
    return {"per_case_mean": case_mean([r["dice"] for r in entry["runs"]]), "epoch_s": epoch_s,
            "training_s": epoch_s * entry["budget"]["epochs"] if epoch_s else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", required=True, help="output folder (equal_time.json, equal_time.md)")
    ap.add_argument("--reference", required=True, help="FOLDER:METHOD every other method is compared with")
    ap.add_argument("--method", action="append", required=True, help="FOLDER:METHOD (repeatable)")
    ap.add_argument("--mode", default="mirror")
    ap.add_argument("--root", default=os.path.join(REPO_ROOT, "results", "Dataset004_Hippocampus"),
                    help="where FOLDER base names are looked up")
    args = ap.parse_args(argv)

    ref = load_method(args.reference, args.root, args.mode)
    others = [load_method(s, args.root, args.mode) for s in args.method]
    for o in others:
        if (o["fold"], o["split_val"]) != (ref["fold"], ref["split_val"]):
            raise SystemExit(f"{o['spec']} was validated on another fold or split than {ref['spec']}: "
                             "a paired comparison needs the same cases")
    ref_sum = summarise(ref)
    rows = []
    for o in others:
        s = summarise(o)
        mean_o, mean_r, delta, p = paired(s["per_case_mean"], ref_sum["per_case_mean"])
        ratio = s["training_s"] / ref_sum["training_s"] if s["training_s"] and ref_sum["training_s"] else None
        rows.append({"spec": o["spec"], "budget": o["budget"], "runs": len(o["runs"]),
                     "run_dice": [round(r["mean_dice"], 4) for r in o["runs"]],
                     "epoch_s": s["epoch_s"], "training_s": s["training_s"], "dice_run_mean": float(mean_o),
                     "reference_dice_run_mean": float(mean_r), "delta": float(delta), "p": float(p),
                     "training_time_ratio": ratio, "cases": len(set(s["per_case_mean"]) & set(ref_sum["per_case_mean"]))})
    command = "python benchmarks/equal_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "mode": args.mode,
              "reference": {**ref, "epoch_s": ref_sum["epoch_s"], "training_s": ref_sum["training_s"]},
              "methods": others, "comparisons": rows}
    os.makedirs(args.o, exist_ok=True)
    with open(os.path.join(args.o, "equal_time.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = format_markdown(result)
    with open(os.path.join(args.o, "equal_time.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def format_markdown(r: Dict) -> str:
    ref = r["reference"]
    lines = ["# Methods across budgets against one reference", "",
             f"Command: `{r['command']}`. Mode `{r['mode']}`; Dice = mean foreground Dice over the validation cases; "
             "per-case means over each method's recorded training runs; Δ and p: paired t-test over the cases "
             "(α = 0.01), method minus reference; training time: the lowest median epoch time over a method's runs "
             "(nnU-Net's epoch times; a run that shared the machine with other work is slower, never faster) times "
             "the budget's epochs, and its ratio to the reference's.", "",
             "| method | folder | budget | runs | Dice of each run | Dice of the run mean | training s (s / epoch) |"
             " Δ vs reference (p) | training time ratio to the reference |", "|---|---|---|---|---|---|---|---|---|"]

    def cells(entry, mean_dice, seconds, epoch_s):
        b = entry["budget"]
        return (f"| {entry['method']} | {os.path.basename(entry['folder'])} | {b['epochs']} × {b['iterations']} "
                f"(batch {b['batch_size']}) | {len(entry['runs'])} | "
                + ", ".join(f"{x['mean_dice']:.4f}" for x in entry["runs"]) + f" | {mean_dice:.4f} | "
                + ("–" if seconds is None else f"{seconds:.0f} ({epoch_s:.0f})") + " |")
    ref_mean = r["comparisons"][0]["reference_dice_run_mean"] if r["comparisons"] else float("nan")
    lines.append(cells(ref, ref_mean, ref["training_s"], ref["epoch_s"]) + " reference | 1 |")
    for entry, c in zip(r["methods"], r["comparisons"]):
        ratio = "–" if c["training_time_ratio"] is None else f"{c['training_time_ratio']:.2f}"
        lines.append(cells(entry, c["dice_run_mean"], c["training_s"], c["epoch_s"])
                     + f" {c['delta']:+.4f} ({c['p']:.2g}) | {ratio} |")
    machines = {m["folder"]: m.get("machine") for m in [ref] + r["methods"]}
    lines += ["", "Machines (from each folder's accuracy.json):", ""]
    for folder, mach in machines.items():
        if mach:
            lines.append(f"- `{folder}`: {mach.get('cpu') or mach.get('gpu')}, {mach.get('cpu_count')} cores, "
                         f"torch {mach.get('torch')}, nnunetv2 {mach.get('nnunetv2')}, {mach.get('date_utc')} UTC")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
