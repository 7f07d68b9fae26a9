"""Sampling settings of one trained diffusion model, paired on the same cases and noise (accuracy issue: test-time
candidates need no retraining, so they are compared on one model, free of the training-to-training noise).

    python benchmarks/sampling_study.py -o results/Dataset004_Hippocampus/sampling_cpu_12x50 \\
        --trainer DiffusionTrainer_zeroInitChainMeanEma_12ep50it \\
        --settings chain:noise:ddpm chain:zeros:ddpm off:noise:ddpm off:zeros:ddpm off:noise:ddim off:zeros:ddim \\
        --accuracy results/Dataset004_Hippocampus/accuracy_cpu_12x50/accuracy.json

Needs nnUNet_raw/_preprocessed/_results and nnUNet_extTrainer set as for the accuracy study
(``benchmarks/accuracy_protocol.py``, which trains the model and links the fold's validation images). A setting is
``TTA:START:SAMPLER[:M][:raw]``: ``nnUNetv2_predict_diffusion --tta TTA --start START --sampler SAMPLER`` with
the output the mean probability of the last M steps' x0_hat (default: all K steps, the default ``--average-last``),
with ``raw`` the trained weights instead of their moving average (``--weights raw``), and seed 0, so every setting draws the same voxel-attached noise (``--start zeros`` still draws, and discards,
the starting noise). One prediction at a time, timed from start to end, resumable (a finished folder has a
``done`` marker).

Reports per setting the mean Dice over the fold's validation cases, the paired t-test against the first setting
(``--reference``), and, with ``--accuracy``, against the per-case mean of the stock runs recorded there, in the
same mirroring (``chain``/``full``/``final`` against stock's default mirroring, ``off`` against stock's
``--disable_tta``). ``--validation-folder``: also score a folder written elsewhere for the same model (e.g.
nnU-Net's final validation, which samples through ``nnUNetv2_predict``'s path) as one more row.
Writes ``sampling.json`` (per-case Dice, commands, seconds, machine, versions) and ``sampling.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_protocol import CONFIG, DATASET, DATASET_ID, _paired, bin_, run_mean, val_images  # noqa: E402
from prediction_study import predict  # noqa: E402

from nnunet_diffusion.config import SAMPLERS, STARTS  # noqa: E402

TTAS = ("full", "final", "chain", "off")


def setting_args(setting: str) -> List[str]:
    """``"chain:zeros:ddim"`` -> ``--tta chain --start zeros --sampler ddim``; an optional field M is
    ``--average-last M`` (``"chain:noise:ddpm:1"``: the last step's output); a last field ``raw`` is
    ``--weights raw`` (the trained weights instead of their moving average)."""
    parts = setting.split(":")
    weights = []
    if len(parts) in (4, 5) and parts[-1] == "raw":
        parts, weights = parts[:-1], ["--weights", "raw"]
    if len(parts) not in (3, 4) or parts[0] not in TTAS or parts[1] not in STARTS or parts[2] not in SAMPLERS \
            or (len(parts) == 4 and not (parts[3].isdigit() and int(parts[3]) >= 1)):
        raise ValueError(f"setting {setting!r}: expected TTA:START:SAMPLER[:M][:raw] with TTA in {TTAS}, START in "
                         f"{STARTS}, SAMPLER in {SAMPLERS}, M an integer >= 1 (steps averaged), raw: the trained "
                         f"weights instead of their average")
    average = ["--average-last", parts[3]] if len(parts) == 4 else []
    return ["--tta", parts[0], "--start", parts[1], "--sampler", parts[2]] + average + weights


def stock_mode(setting: str) -> str:
    """The stock mode a setting is compared with: its mirroring or none."""
    return "off" if setting.split(":")[0] == "off" else "mirror"


def paired(dice: Dict[str, float], ref: Dict[str, float]) -> Dict[str, float]:
    """Paired comparison over the common cases: both means, the difference, the t-test's p."""
    mean, ref_mean, delta, p = _paired(dice, ref)
    return {"delta": float(delta), "p": float(p), "mean": float(mean), "ref_mean": float(ref_mean),
            "cases": len(set(dice) & set(ref))}


def write_table(result: Dict, out: str) -> None:
    from nnunet_diffusion.machine import describe
    lines = [f"# Sampling settings of {result['trainer']}", "",
             f"{DATASET} {CONFIG}, fold {result['fold']} ({result['num_cases']} validation cases); "
             f"{describe(result['device'], result['machine'])}. One prediction per row, seed 0 (the same "
             "voxel-attached noise in every row), output = mean probability of all steps' x0_hat.", "",
             f"Command: `{result['command']}`", "",
             f"| setting | Dice | Δ vs {result['reference']} (p) | stock mode | stock run mean | Δ vs stock (p) | "
             "s / case |", "|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        ref, stock = row.get("vs_reference"), row.get("vs_stock")
        lines.append(
            f"| {name} | {row['dice']:.4f} | "
            + (f"{ref['delta']:+.4f} ({ref['p']:.2g})" if ref else "–") + " | "
            + (f"{stock_mode(name) if ':' in name else 'mirror'} | {stock['ref_mean']:.4f} | "
               f"{stock['delta']:+.4f} ({stock['p']:.2g})" if stock else "– | – | –") + " | "
            + (f"{row['seconds_per_case']:.2f}" if row.get("seconds_per_case") else "–") + " |")
    lines += ["", "Δ and p: paired t-test over the cases; stock: the per-case mean Dice over the stock runs recorded "
              f"in `{result.get('accuracy') or '-'}`, in the same mirroring."]
    with open(os.path.join(out, "sampling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", required=True, help="results folder (sampling.json, sampling.md)")
    ap.add_argument("--trainer", required=True, help="diffusion model folder's trainer name, e.g. "
                                                     "DiffusionTrainer_zeroInitChainMeanEma_12ep50it")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("-device", default="cpu")
    ap.add_argument("--settings", nargs="+", default=["chain:noise:ddpm", "chain:zeros:ddpm"],
                    help="TTA:START:SAMPLER[:M][:raw], the first is the reference unless --reference says otherwise")
    ap.add_argument("--reference", default=None)
    ap.add_argument("--accuracy", default=None, help="accuracy.json holding the stock runs' per-case Dice")
    ap.add_argument("--validation-folder", default=None,
                    help="a prediction folder of the same model written elsewhere (scored as one more row)")
    args = ap.parse_args(argv)
    for s in args.settings:
        try:
            setting_args(s)
        except ValueError as e:
            ap.error(str(e))
    reference = args.reference or args.settings[0]
    if reference not in args.settings:
        ap.error(f"--reference {reference!r} is not among --settings")

    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    from nnunet_diffusion.evaluation import evaluate_folders
    from nnunet_diffusion.machine import machine_info

    out = os.path.abspath(args.o)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log = os.path.join(out, "logs", "predict.log")
    work = os.path.join(str(nnUNet_results), DATASET, "accuracy_protocol_work")
    cases = val_images(args.fold, work)
    gt = os.path.join(str(nnUNet_preprocessed), DATASET, "gt_segmentations")
    base = ["-i", os.path.join(work, "images"), "-d", DATASET_ID, "-c", CONFIG, "-f", str(args.fold),
            "-device", args.device, "-npp", "1", "-nps", "1", "-tr", args.trainer, "--seed", "0"]
    study = os.path.join(work, "sampling_study", args.trainer)
    stock = {}
    if args.accuracy:
        stock = run_mean(json.load(open(args.accuracy)), "nnUNetTrainer")
        if not stock:
            raise SystemExit(f"{args.accuracy} records no nnUNetTrainer run")
    result_path = os.path.join(out, "sampling.json")
    result = json.load(open(result_path)) if os.path.isfile(result_path) else {}
    folders = {s: os.path.join(study, s.replace(":", "_")) for s in args.settings}
    if "machine" not in result or not all(os.path.isfile(os.path.join(f, "done")) for f in folders.values()):
        result["machine"] = machine_info(args.device)  # a rerun that only re-scores keeps the predictions' machine
    result.update({"dataset": DATASET, "configuration": CONFIG, "fold": args.fold, "num_cases": len(cases),
                   "trainer": args.trainer, "device": args.device,
                   "reference": reference, "accuracy": os.path.relpath(args.accuracy) if args.accuracy else None,
                   "command": "python benchmarks/sampling_study.py " + " ".join(argv or sys.argv[1:])})
    rows = result.setdefault("rows", {})

    def dice_of(folder: str) -> Dict[str, float]:
        return {c: v["case"]["dice"] for c, v in evaluate_folders(gt, folder)["cases"].items()}

    for s, folder in folders.items():
        cmd = [bin_("nnUNetv2_predict_diffusion"), *base, *setting_args(s)]
        seconds = predict(cmd, folder, log)
        rows[s] = {"command": " ".join([os.path.basename(cmd[0]), *cmd[1:], "-o", folder]),
                   "seconds": round(seconds, 2), "seconds_per_case": round(seconds / len(cases), 3),
                   "per_case": dice_of(folder)}
        rows[s]["dice"] = float(np.mean(list(rows[s]["per_case"].values())))
        print(f"{s}: Dice {rows[s]['dice']:.4f}, {rows[s]['seconds_per_case']:.2f} s/case", flush=True)
    if args.validation_folder:
        name = "nnU-Net's final validation (full mirroring, the trainer's start)"
        rows[name] = {"command": None, "folder": os.path.abspath(args.validation_folder),
                      "per_case": dice_of(args.validation_folder)}
        rows[name]["dice"] = float(np.mean(list(rows[name]["per_case"].values())))
    for name, row in rows.items():
        if name != reference and reference in rows:
            row["vs_reference"] = paired(row["per_case"], rows[reference]["per_case"])
        mode = stock_mode(name) if ":" in name else "mirror"
        if stock.get(mode):
            row["vs_stock"] = paired(row["per_case"], stock[mode])
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    write_table(result, out)
    print(open(os.path.join(out, "sampling.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
