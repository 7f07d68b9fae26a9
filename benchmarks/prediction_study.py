"""Prediction modes, uncertainty and the ensemble with stock, measured on one trained diffusion model against
the stock model trained on the same split and budget (Hippocampus fold 0, the accuracy study's models).

    python benchmarks/prediction_study.py -o results/Dataset004_Hippocampus/prediction_cpu_12x50_DiffusionTrainer \\
        --trainer DiffusionTrainer_12ep50it --stock nnUNetTrainer_12ep50it

Needs nnUNet_raw/_preprocessed/_results set as for the accuracy study (benchmarks/accuracy_protocol.py, which
trains both models and links the validation images). Every prediction goes through the real commands
(``nnUNetv2_predict_diffusion`` / ``nnUNetv2_predict``, ``-npp 1 -nps 1``), one at a time, each timed from
start to end (the same model loading in every run, so the per-case seconds include it). Resumable: a finished
folder (``done`` marker) is reused.

1. TTA modes (``--modes``, default full final chain off; ``MODE:avgM`` adds ``--average-last M``, the mean
   probability of the last M steps' x0_hat): Dice per case, seconds per case, paired t-test of each mode
   against ``full`` (``--reference-mode``: e.g. ``full:avg5`` for a model whose trained output is the mean of
   its steps); the rule for the default: among the modes whose mean Dice is within 0.005 of the reference,
   the one with the fewest network calls per tile (chain/off K, final K - 1 + M, full K*M), ties broken by
   the higher Dice (modes with the same calls differ in time only by measurement noise).
   Stock with its default mirroring and with ``--disable_tta`` is timed on the same cases; every ratio says
   what it is a ratio to. ``--stock-time-only``: the stock model serves only as the timing reference (e.g. a
   short-budget model of the same plans: the weights do not change the time), so its Dice is not reported and
   steps 2 and 3, which need a trained stock model, are skipped.
2. Ensemble: ``nnUNetv2_ensemble --save_npz`` of the N-sample diffusion and the stock probabilities,
   compared with stock alone (``nnunet-diffusion compare``: paired tests on per-case Dice). With
   ``--second-stock TRAINER`` (another training run of stock's network at the same budget), the control: the
   ensemble of stock with that second model, by the same command, compared with stock and with the diffusion +
   stock ensemble (any two models' ensemble tends to beat one; this measures what the diffusion model adds
   beyond that); its entropy is scored in step 3 too.
3. Uncertainty (``nnunet-diffusion uncertainty``): stock's softmax entropy (its ``--save_probabilities``),
   the diffusion model's entropy with one sample (the chosen mode), and with ``--num-samples N`` (entropy and
   mutual information), and the ensemble's entropy, each against its own errors, with per-case paired tests
   against stock; ``uncertainty/example.png``: the case of median stock Dice, each method's prediction,
   uncertainty map and errors side by side.

Writes prediction.json (every per-case value, command, timing, machine, versions) and prediction.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from typing import Dict, List

import numpy as np

from study_lib import CONFIG, DATASET, DATASET_ID, sh, tool_path, val_images

RULE = 0.005
TWO_STOCK = "stock + second stock ensemble (entropy)"


def predict(cmd: List[str], folder: str, log: str) -> float:
    """Run one prediction into ``folder`` unless done; returns its wall-clock seconds (recorded in ``done``)."""
    done = os.path.join(folder, "done")
    if os.path.isfile(done):
        return float(open(done).read().strip() or "nan")
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    sh(cmd + ["-o", folder], log)
    seconds = time.perf_counter() - t0
    with open(done, "w") as f:
        f.write(f"{seconds:.2f}\n")
    return seconds


def calls_per_tile(mode: str, steps: int = 5, mirrorings: int = 8) -> int:
    """Network evaluations per tile of a mode with K = ``steps`` and M = ``mirrorings`` (8 in 3D)."""
    tta = mode.partition(":")[0]
    return {"off": steps, "chain": steps, "sample": steps, "final": steps - 1 + mirrorings,
            "full": steps * mirrorings}[tta]


def ensemble(members: List[str], folder: str, log: str) -> None:
    """``nnUNetv2_ensemble --save_npz`` of ``members`` into ``folder`` unless done (probabilities kept, so the
    ensemble's entropy can be scored too)."""
    if os.path.isfile(os.path.join(folder, "done")) and glob.glob(os.path.join(folder, "*.npz")):
        return
    shutil.rmtree(folder, ignore_errors=True)
    sh([tool_path("nnUNetv2_ensemble"), "-i", *members, "-o", folder, "-np", "1", "--save_npz"], log)
    open(os.path.join(folder, "done"), "w").close()


def mode_args(mode: str) -> List[str]:
    """``"chain"`` -> ``--tta chain --average-last 1`` (the last step's output); ``"chain:avg3"`` ->
    ``--tta chain --average-last 3``."""
    tta, _, extra = mode.partition(":")
    if not extra:
        return ["--tta", tta, "--average-last", "1"]
    if not extra.startswith("avg") or not extra[3:].isdigit():
        raise ValueError(f"mode {mode!r}: expected MODE or MODE:avgM")
    return ["--tta", tta, "--average-last", extra[3:]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", required=True, help="results folder (prediction.json, prediction.md, reports)")
    ap.add_argument("--trainer", required=True, help="diffusion trainer folder name, e.g. DiffusionTrainer_12ep50it")
    ap.add_argument("--stock", required=True, help="stock trainer on the same split and budget")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("-device", default="cpu")
    ap.add_argument("--modes", nargs="+", default=["full", "final", "chain", "off"])
    ap.add_argument("--num-samples", type=int, default=5, help="samples for the uncertainty run (default 5)")
    ap.add_argument("--full-reference", default=None,
                    help="without 'full' in --modes: a folder of full-mirroring predictions of the same model (e.g. "
                         "nnU-Net's final validation, fold_0/validation) whose Dice stands in for full (not timed)")
    ap.add_argument("--reference-mode", default="full",
                    help="the mode the rule compares with (default full; e.g. full:avg5 for a model trained to "
                         "return the mean of its steps, whose nnU-Net output is mirroring around that mean)")
    ap.add_argument("--stock-time-only", action="store_true",
                    help="the stock model is only the timing reference: no stock Dice, no uncertainty or ensemble")
    ap.add_argument("--retime-stock", action="store_true",
                    help="time both stock runs a second time after the diffusion modes; their time is the mean")
    ap.add_argument("--second-stock", default=None, metavar="TRAINER",
                    help="a second model of stock's network, training and budget (another training run): the ensemble "
                         "of stock with it is the control for the diffusion + stock ensemble (does the diffusion "
                         "model add more to stock than a second stock model does?)")
    ap.add_argument("--uncertainty-mode", default=None,
                    help="TTA mode of the uncertainty and ensemble runs (default: the one the rule picks)")
    args = ap.parse_args(argv)

    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    from nnunet_diffusion.evaluation import compare, evaluate_folders, paired_tests
    from nnunet_diffusion.machine import machine_info
    from nnunet_diffusion.uncertainty import uncertainty_report

    out = os.path.abspath(args.o)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log = os.path.join(out, "logs", "predict.log")
    work = os.path.join(str(nnUNet_results), DATASET, "accuracy_protocol_work")
    cases = val_images(args.fold, work)
    images = os.path.join(work, "images")
    gt = os.path.join(str(nnUNet_preprocessed), DATASET, "gt_segmentations")
    base = ["-i", images, "-d", DATASET_ID, "-c", CONFIG, "-f", str(args.fold), "-device", args.device,
            "-npp", "1", "-nps", "1", "--save_probabilities"]
    study = os.path.join(work, "prediction_study", args.trainer)
    result_path = os.path.join(out, "prediction.json")
    result = json.load(open(result_path)) if os.path.isfile(result_path) else {}
    result.update({"dataset": DATASET, "configuration": CONFIG, "fold": args.fold, "num_cases": len(cases),
                   "trainer": args.trainer, "stock": args.stock, "device": args.device,
                   "machine": machine_info(args.device),
                   "command": "python benchmarks/prediction_study.py " + " ".join(argv or sys.argv[1:])})

    def save():
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)

    def dice_of(folder):
        ev = evaluate_folders(gt, folder)
        return {c: v["case"]["dice"] for c, v in ev["cases"].items()}

    # 1. TTA modes and stock timings
    runs = result.setdefault("runs", {})
    for name, cmd, folder in (
            [("stock_mirror", [tool_path("nnUNetv2_predict"), *base, "-tr", args.stock],
              os.path.join(study, "stock_mirror")),
             ("stock_off", [tool_path("nnUNetv2_predict"), *base, "-tr", args.stock, "--disable_tta"],
              os.path.join(study, "stock_off"))] +
            [(f"tta_{m}", [tool_path("nnUNetv2_predict_diffusion"), *base, "-tr", args.trainer, *mode_args(m)],
              os.path.join(study, f"tta_{m.replace(':', '_')}")) for m in args.modes]):
        seconds = predict(cmd, folder, log)
        runs[name] = {"command": " ".join([os.path.basename(cmd[0]), *cmd[1:], "-o", folder]), "folder": folder,
                      "seconds": round(seconds, 2), "seconds_per_case": round(seconds / len(cases), 3),
                      "dice": dice_of(folder)}
        print(f"{name}: Dice {np.mean(list(runs[name]['dice'].values())):.4f}, "
              f"{runs[name]['seconds_per_case']:.2f} s/case", flush=True)
        save()
    if args.retime_stock:
        # stock timed again after the diffusion modes (A B... A): its time is the mean of both runs
        for name, cmd, folder in (("stock_mirror", [tool_path("nnUNetv2_predict"), *base, "-tr", args.stock],
                                   os.path.join(study, "stock_mirror_retime")),
                                  ("stock_off", [tool_path("nnUNetv2_predict"), *base, "-tr", args.stock, "--disable_tta"],
                                   os.path.join(study, "stock_off_retime"))):
            first = float(open(os.path.join(runs[name]["folder"], "done")).read())
            again = predict(cmd, folder, log)
            runs[name].update({"timings_s": [round(first, 2), round(again, 2)], "seconds": round((first + again) / 2, 2),
                               "seconds_per_case": round((first + again) / 2 / len(cases), 3),
                               "timing_note": "mean of two timed runs, before and after the diffusion modes"})
            print(f"{name} re-timed: {first / len(cases):.2f} and {again / len(cases):.2f} s/case", flush=True)
            save()
    if args.stock_time_only:
        for name in ("stock_mirror", "stock_off"):
            runs[name]["dice"] = None
            runs[name]["note"] = "timing reference only (its weights are not the compared model's)"
    if args.reference_mode not in args.modes and args.full_reference:
        runs[f"tta_{args.reference_mode}"] = {"command": None, "folder": os.path.abspath(args.full_reference), "seconds": None,
                            "seconds_per_case": None, "dice": dice_of(args.full_reference),
                            "note": "full mirroring from this folder (e.g. nnU-Net's final validation of the same model: "
                                    "the noise of nnUNetv2_predict's path, seed 0 per call in the frame the network "
                                    "sees); not predicted or timed by this script"}
        save()
    table = []
    full = runs.get(f"tta_{args.reference_mode}")
    for m in args.modes:
        r = runs[f"tta_{m}"]
        row = {"mode": m, "calls_per_tile": calls_per_tile(m), "dice": float(np.mean(list(r["dice"].values()))),
               "seconds_per_case": r["seconds_per_case"],
               "vs_stock_mirror": r["seconds"] / runs["stock_mirror"]["seconds"],
               "vs_stock_off": r["seconds"] / runs["stock_off"]["seconds"]}
        if full is not None:
            cs = sorted(set(r["dice"]) & set(full["dice"]))
            a, b = [r["dice"][c] for c in cs], [full["dice"][c] for c in cs]
            row.update({"delta_vs_full": float(np.mean(a) - np.mean(b)),
                        "p_vs_full": paired_tests(a, b)["t_pvalue"],
                        "vs_full_time": r["seconds"] / full["seconds"] if full["seconds"] else None})
        table.append(row)
    chosen = None
    if full is not None:
        eligible = [row for row in table if row["delta_vs_full"] >= -RULE]
        chosen = (min(eligible, key=lambda row: (row["calls_per_tile"], -row["dice"]))["mode"] if eligible
                  else args.reference_mode)
    result["tta_table"], result["chosen_mode"], result["reference_mode"] = table, chosen, args.reference_mode
    result["rule"] = (f"fewest network calls per tile among the modes with Dice >= {args.reference_mode} - {RULE}, "
                      "ties broken by the higher Dice")
    save()
    if args.stock_time_only:
        write_md(result, out)
        print(open(os.path.join(out, "prediction.md")).read())
        return 0

    # N samples in the chosen mode (for the ensemble and the uncertainty scores)
    mode = args.uncertainty_mode or chosen or args.modes[0]
    ns_folder = os.path.join(study, f"tta_{mode.replace(':', '_')}_samples{args.num_samples}")
    cmd = [tool_path("nnUNetv2_predict_diffusion"), *base, "-tr", args.trainer, *mode_args(mode), "--uncertainty",
           "--num-samples", str(args.num_samples)]
    seconds = predict(cmd, ns_folder, log)
    runs[f"samples{args.num_samples}"] = {"command": " ".join([os.path.basename(cmd[0]), *cmd[1:], "-o", ns_folder]),
                                          "folder": ns_folder, "seconds": round(seconds, 2),
                                          "seconds_per_case": round(seconds / len(cases), 3),
                                          "dice": dice_of(ns_folder)}
    save()
    # 2. ensemble with stock (mean of the two probability maps, nnU-Net's own command, probabilities kept so the
    # ensemble's entropy is scored too)
    ens = os.path.join(study, f"ensemble_{mode.replace(':', '_')}_samples{args.num_samples}_stock")
    ensemble([ns_folder, runs["stock_mirror"]["folder"]], ens, log)

    # the control: stock with a second stock model, the same ensemble command
    two = None
    if args.second_stock:
        second = os.path.join(study, "second_stock_mirror")
        cmd = [tool_path("nnUNetv2_predict"), *base, "-tr", args.second_stock]
        seconds = predict(cmd, second, log)
        runs["second_stock_mirror"] = {"command": " ".join([os.path.basename(cmd[0]), *cmd[1:], "-o", second]),
                                       "folder": second, "seconds": round(seconds, 2), "dice": dice_of(second)}
        two = os.path.join(study, "ensemble_stock_second_stock")
        ensemble([runs["stock_mirror"]["folder"], second], two, log)
        save()

    # 3. uncertainty of every method against its own errors
    one = runs[f"tta_{mode}"]["folder"]
    n = f"diffusion, {args.num_samples} samples"
    folders = [runs["stock_mirror"]["folder"], one, ns_folder, ns_folder, ens]
    maps = ["probabilities", "probabilities", "entropy", "mutual_info", "probabilities"]
    names = ["stock (softmax entropy)", "diffusion, 1 sample (entropy)", f"{n} (entropy)",
             f"{n} (mutual information)", f"{n} + stock ensemble (entropy)"]
    if two:
        folders, maps, names = folders + [two], maps + ["probabilities"], names + [TWO_STOCK]
    rep = uncertainty_report(gt, folders, os.path.join(out, "uncertainty"), maps=maps, names=names)
    result["uncertainty"] = {k: {"dice": v["dice"]["mean"], "voxel_auroc": v["voxel"]["auroc"],
                                 "voxel_auprc": v["voxel"]["auprc"],
                                 "ece": (v["calibration"] or {}).get("ece"),
                                 "brier": (v["calibration"] or {}).get("brier"), "qc_spearman": v["qc"]["spearman"],
                                 "qc_worst_auroc": v["qc"]["worst_auroc"],
                                 "expected_dice": (v["qc_expected_dice"] or {}).get("mean_expected_dice"),
                                 "expected_dice_spearman": (v["qc_expected_dice"] or {}).get("spearman"),
                                 "expected_dice_mae": (v["qc_expected_dice"] or {}).get("mean_abs_error"),
                                 "expected_dice_worst_auroc": (v["qc_expected_dice"] or {}).get("worst_auroc")}
                             for k, v in rep["methods"].items()}
    result["uncertainty_mode"] = mode
    # one case, stock's and the diffusion model's maps beside their errors: the case of median stock Dice
    from nnunet_diffusion.uncertainty import example_figure, method_cases
    stock_dice = runs["stock_mirror"]["dice"]
    case = sorted(stock_dice, key=stock_dice.get)[len(stock_dice) // 2]
    entries = [method_cases(gt, folder, m)[case] for folder, m in
               ((runs["stock_mirror"]["folder"], "probabilities"), (ns_folder, "entropy"), (ns_folder, "mutual_info"))]
    labels = ["stock (softmax entropy)", f"{n} (entropy)", f"{n} (MI)"]
    example_figure(os.path.join(images, f"{case}_0000.nii.gz"), entries, labels,
                   os.path.join(out, "uncertainty", "example.png"),
                   title=f"{case} (median stock Dice); uncertainty in nats, errors = prediction != reference")
    result["example_case"] = case
    save()

    report = compare(ens, runs["stock_mirror"]["folder"], gt, os.path.join(out, "ensemble_vs_stock"),
                     names=["diffusion + stock ensemble", "stock"])
    result["ensemble"] = {"members": [ns_folder, runs["stock_mirror"]["folder"]],
                          "dice": report["summary"]["diffusion + stock ensemble"]["case"]["dice"]["mean"],
                          "stock_dice": report["summary"]["stock"]["case"]["dice"]["mean"],
                          "t_pvalue": report["tests"]["t_pvalue"], "verdict": report["verdict"]}
    if two:
        vs_stock = compare(two, runs["stock_mirror"]["folder"], gt, os.path.join(out, "two_stock_vs_stock"),
                           names=["stock + second stock ensemble", "stock"])
        vs_two = compare(ens, two, gt, os.path.join(out, "ensemble_vs_two_stock"),
                         names=["diffusion + stock ensemble", "stock + second stock ensemble"])
        result["ensemble"]["control"] = {
            "second_stock": args.second_stock, "members": [runs["stock_mirror"]["folder"], runs["second_stock_mirror"]["folder"]],
            "second_stock_dice": float(np.mean(list(runs["second_stock_mirror"]["dice"].values()))),
            "dice": vs_stock["summary"]["stock + second stock ensemble"]["case"]["dice"]["mean"],
            "vs_stock_t_pvalue": vs_stock["tests"]["t_pvalue"],
            "diffusion_ensemble_minus_control": (result["ensemble"]["dice"]
                                                 - vs_stock["summary"]["stock + second stock ensemble"]["case"]["dice"]["mean"]),
            "diffusion_ensemble_vs_control_t_pvalue": vs_two["tests"]["t_pvalue"], "verdict": vs_two["verdict"]}
    save()
    write_md(result, out)
    print(open(os.path.join(out, "prediction.md")).read())
    return 0


def write_md(result: Dict, out: str) -> None:
    from nnunet_diffusion.machine import describe
    runs = result["runs"]
    ref = result.get("reference_mode", "full")
    lines = [f"# Prediction study: {result['trainer']} vs {result['stock']}", "",
             f"{result['dataset']} {result['configuration']}, fold {result['fold']} ({result['num_cases']} validation "
             f"cases); {describe(result['device'], result['machine'])}. One run per row; seconds per case = "
             "wall-clock of the whole command / cases (model loading included, the same in every run).", "",
             f"Command: `{result['command']}`", "",
             "## TTA modes", "",
             f"| mode | calls / tile | Dice | Δ vs {ref} | p vs {ref} | s / case | time vs {ref} | time vs stock (mirroring) | "
             "time vs stock (--disable_tta) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["tta_table"]:
        lines.append(f"| {r['mode']} | {r.get('calls_per_tile', '')} | {r['dice']:.4f} | {r.get('delta_vs_full', float('nan')):+.4f} | "
                     f"{r.get('p_vs_full', float('nan')):.2g} | {r['seconds_per_case']:.2f} | "
                     f"{'–' if r.get('vs_full_time') is None else format(r['vs_full_time'], '.2f') + '×'} | {r['vs_stock_mirror']:.2f}× | {r['vs_stock_off']:.2f}× |")
    for name, label, calls in (("stock_mirror", "mirroring", 8), ("stock_off", "--disable_tta", 1)):
        r = runs[name]
        dice = "–" if r["dice"] is None else f"{np.mean(list(r['dice'].values())):.4f}"
        timed = r.get("timings_s")
        n = result["num_cases"]
        secs = f"{r['seconds_per_case']:.2f}" + (
            " (mean of " + ", ".join(f"{t / n:.2f}" for t in timed) + ")" if timed else "")
        lines.append(f"| stock, {label} | {calls} | {dice} | | | {secs} | | | |")
    full = runs.get(f"tta_{ref}", {})
    if full.get("note"):
        lines.append(f"| {ref} (reference) | 40 | {np.mean(list(full['dice'].values())):.4f} | | | | | | |")
        lines += ["", f"`{ref}` reference: `{full['folder']}`, {full['note']}."]
    if runs["stock_mirror"].get("note"):
        lines += ["", f"Stock model `{result['stock']}`: {runs['stock_mirror']['note']}."]
    lines += ["", f"Rule: {result['rule']} → **{result['chosen_mode']}**."]
    if "uncertainty" in result:
        lines += ["", f"## Uncertainty (TTA {result['uncertainty_mode']}; report: `uncertainty/report.md`)", "",
                  "| method | Dice | voxel AUROC | AUPRC | ECE | Brier | case-QC Spearman | worst-10% AUROC | "
                  "expected Dice | its Spearman | its mean abs. error | its worst-10% AUROC |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def f(v, d=3):
            return "–" if v is None else f"{v:.{d}f}"
        for name, u in result["uncertainty"].items():
            lines.append(f"| {name} | {f(u['dice'], 4)} | {f(u['voxel_auroc'])} | {f(u['voxel_auprc'])} | "
                         f"{f(u['ece'], 4)} | {f(u['brier'], 4)} | {f(u['qc_spearman'])} | {f(u['qc_worst_auroc'])} | "
                         f"{f(u.get('expected_dice'), 4)} | {f(u.get('expected_dice_spearman'))} | "
                         f"{f(u.get('expected_dice_mae'), 4)} | {f(u.get('expected_dice_worst_auroc'))} |")
    if "ensemble" in result:
        e = result["ensemble"]
        lines += ["", "## Ensemble with stock (`nnUNetv2_ensemble`, mean of the probabilities)", "",
                  f"Dice {e['dice']:.4f} vs stock {e['stock_dice']:.4f} (paired t-test p = {e['t_pvalue']:.3g}): "
                  f"{e['verdict']}. Report: `ensemble_vs_stock/report.md`."]
        if "control" in e:
            c = e["control"]
            lines += ["", f"Control: stock with a second stock model (`{c['second_stock']}`, Dice "
                          f"{c['second_stock_dice']:.4f} alone), the same command: Dice {c['dice']:.4f} vs stock "
                          f"{e['stock_dice']:.4f} (p = {c['vs_stock_t_pvalue']:.3g}; `two_stock_vs_stock/report.md`). "
                          f"The diffusion + stock ensemble against it: {c['diffusion_ensemble_minus_control']:+.4f} "
                          f"(p = {c['diffusion_ensemble_vs_control_t_pvalue']:.3g}): {c['verdict']} "
                          "(`ensemble_vs_two_stock/report.md`)."]
    with open(os.path.join(out, "prediction.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
