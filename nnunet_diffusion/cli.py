"""The ``nnunet-diffusion`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from nnunet_diffusion.options import int_in_range, trainers_path  # noqa: F401 (trainers_path: the CLI's path)


def _steps(text: str) -> int:
    # imported here so that other sub-commands (trainers-path) start without torch
    from nnunet_diffusion.schedule import NUM_BASE_LEVELS
    return int_in_range("--steps", 1, NUM_BASE_LEVELS)(text)


def _cmd_schedule(args: argparse.Namespace) -> int:
    from nnunet_diffusion.schedule import Schedule, format_table
    rows = Schedule.resampled(args.steps).rows()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"Resampled linear schedule, K = {args.steps} levels of the 1001-level base chain "
              f"(beta 1e-4 ... 0.02); c0/ct: posterior mean = c0 * x0_hat + ct * x_k")
        print(format_table(rows))
    return 0


def _cmd_trainers_path(args: argparse.Namespace) -> int:
    print(trainers_path())
    return 0


def _labels(values: Optional[List[int]]) -> Optional[List[int]]:
    if values is not None and any(v <= 0 for v in values):
        raise ValueError(f"-l takes foreground labels (> 0), got {values}")
    return values


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nnunet_diffusion.evaluation import evaluate_folders
    result = evaluate_folders(args.ref, args.pred, _labels(args.l), args.tolerance, args.file_ending)
    if args.steps:
        from nnunet_diffusion.evaluation import step_suffixes
        suffixes = step_suffixes(args.pred, args.file_ending)
        if not suffixes:
            raise ValueError(f"--steps: {args.pred} holds no CASE_step<k> files (predict with --save-steps)")
        result["steps"] = {}
        for suffix in suffixes:
            r = evaluate_folders(args.ref, args.pred, result["labels"], args.tolerance, args.file_ending, suffix)
            result["steps"][suffix[1:]] = {"summary": r["summary"],
                                           "per_case_dice": {c: v["case"]["dice"] for c, v in r["cases"].items()}}
            print(f"{suffix[1:]}: Dice {r['summary']['case']['dice']['mean']:.4f} over {r['summary']['num_cases']} "
                  f"cases")
    os.makedirs(os.path.dirname(os.path.abspath(args.o)), exist_ok=True)
    with open(args.o, "w") as f:
        json.dump(result, f, indent=1)
    s = result["summary"]["case"]
    print(f"{result['summary']['num_cases']} cases: " + ", ".join(
        f"{m.upper()} {s[m]['mean']:.3f} ({s[m]['std']:.3f})" for m in ("dice", "nsd", "hd95", "cd")))
    if result["missing_predictions"]:
        print(f"warning: {len(result['missing_predictions'])} reference case(s) have no prediction: "
              f"{', '.join(result['missing_predictions'][:5])}", file=sys.stderr)
    print(f"wrote {args.o}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from nnunet_diffusion.evaluation import compare
    report = compare(args.a, args.b, args.labels, args.o, _labels(args.l), args.names, args.tolerance,
                     file_ending=args.file_ending)
    print(f"{report['num_cases']} cases. {report['verdict']}.")
    print(f"wrote {os.path.join(args.o, 'report.md')}, report.json, per_class_dice.png")
    return 0


def _cmd_uncertainty(args: argparse.Namespace) -> int:
    from nnunet_diffusion.uncertainty import uncertainty_report
    maps = ["probabilities"] if args.probabilities else args.map
    report = uncertainty_report(args.ref, args.pred, args.o, maps, args.names, _labels(args.l), args.margin,
                                qc_fraction=args.qc_fraction, file_ending=args.file_ending)
    print(open(os.path.join(args.o, "report.md")).read())
    print(f"wrote {os.path.join(args.o, 'report.md')}, report.json, reliability.png "
          f"({len(report['cases'])} cases)")
    return 0


def _non_negative_mm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--margin must be a number of mm >= 0, got {text!r}")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--margin must be a number of mm >= 0, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tolerance must be a positive number of mm, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--tolerance must be a positive number of mm, got {value}")
    return value


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from nnunet_diffusion.benchmark import run_benchmark
    from nnunet_diffusion.budget import parse_budget
    budget = parse_budget(args.budget) if args.budget else None
    run_benchmark(args.d, args.c, args.o, device=args.device, quick=args.quick, budget=budget,
                  repeats=args.repeats, plans=args.p, trainer=args.tr)
    print(open(os.path.join(args.o, "benchmark.md")).read())
    print(f"wrote {os.path.join(args.o, 'benchmark.json')} and benchmark.md")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_diffusion.release import release_model
    if nnUNet_results is None:
        raise ValueError("nnUNet_results is not set")
    try:
        dataset = maybe_convert_to_dataset_name(args.d)
    except RuntimeError as e:
        raise ValueError(str(e)) from e
    folder = os.path.join(nnUNet_results, dataset, f"{args.tr}__{args.p}__{args.c}")
    try:
        info = release_model(folder, args.f, args.o, args.chk, half=args.half, overwrite=args.overwrite,
                             as_fold=args.as_fold, as_trainer=args.as_trainer)
    except (FileNotFoundError, FileExistsError, RuntimeError) as e:
        raise ValueError(str(e)) from e
    print(f"wrote {args.o} ({info['zip_bytes'] / 2**20:.1f} MiB, weights {info['storage']}) and {args.o}.sha256\n"
          f"weights SHA-256 {info['weights_sha256']} (checked whenever the weights are loaded)\n"
          f"install with: nnUNetv2_install_pretrained_model_from_zip {args.o}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_diffusion.budget import parse_budget
    from nnunet_diffusion.experiment import run_experiment
    budget = parse_budget(args.budget)
    out = args.o or os.path.join(str(nnUNet_results), maybe_convert_to_dataset_name(args.d), "experiments",
                                 f"{args.table}_{budget[0]}x{budget[1]}")
    run_experiment(args.table, args.d, args.folds, budget, args.device, out, jobs=args.jobs, plans_identifier=args.p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion",
                                     description="Diffusion segmentation (Fu et al. 2023) for nnU-Net v2.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schedule", help="print the resampled noise schedule")
    p.add_argument("--steps", type=_steps, default=5, help="number of levels K (1 ... 1001), default 5")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per level k = 1 ... K")
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("trainers-path", help="print the folder to export as nnUNet_extTrainer")
    p.set_defaults(func=_cmd_trainers_path)

    p = sub.add_parser("evaluate", help="paper metrics (Dice, NSD, HD95, centroid distance) of a prediction folder")
    p.add_argument("ref", help="folder with reference label files")
    p.add_argument("pred", help="folder with predicted label files (same names), or an nnU-Net results folder")
    p.add_argument("-o", required=True, help="output JSON file")
    p.add_argument("-l", type=int, nargs="+", default=None, help="foreground labels (default: all found)")
    p.add_argument("--tolerance", type=_tolerance, default=1.0, help="NSD tolerance in mm (default 1.0)")
    p.add_argument("--file-ending", default=".nii.gz")
    p.add_argument("--steps", action="store_true",
                   help="also score every step of a --save-steps folder (CASE_step{k}) and print Dice per step")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="two methods side by side: paper table, per-class Dice, paired tests")
    p.add_argument("a", help="prediction folder or nnU-Net results folder (cross-validation predictions)")
    p.add_argument("b", help="prediction folder or nnU-Net results folder")
    p.add_argument("--labels", required=True, help="folder with the reference label files")
    p.add_argument("-o", required=True, help="output folder for report.md, report.json, per_class_dice.png")
    p.add_argument("-l", type=int, nargs="+", default=None, help="foreground labels (default: all found)")
    p.add_argument("--names", nargs=2, default=None, help="names of A and B in the report")
    p.add_argument("--tolerance", type=_tolerance, default=1.0, help="NSD tolerance in mm (default 1.0)")
    p.add_argument("--file-ending", default=".nii.gz")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("uncertainty", help="score uncertainty maps: error detection (AUROC, AUPRC), calibration "
                                           "(ECE, Brier), case-level quality control; one or more methods")
    p.add_argument("ref", help="folder with reference label files")
    p.add_argument("pred", nargs="+", help="prediction folder(s): CASE.nii.gz with CASE_entropy / CASE_mutual_info "
                                          "(--uncertainty) and/or CASE.npz (--save_probabilities)")
    p.add_argument("-o", required=True, help="output folder for report.md, report.json, reliability.png")
    p.add_argument("--map", nargs="+", choices=["entropy", "mutual_info", "probabilities"], default=["entropy"],
                   help="uncertainty per method (one for all, or one per folder): CASE_entropy, CASE_mutual_info, "
                        "or the entropy of CASE.npz ('probabilities'); default entropy")
    p.add_argument("--probabilities", action="store_true",
                   help="score the entropy of CASE.npz for every method (same as --map probabilities)")
    p.add_argument("--names", nargs="+", default=None, help="one name per prediction folder")
    p.add_argument("-l", type=int, nargs="+", default=None, help="foreground labels (default: all found)")
    p.add_argument("--margin", type=_non_negative_mm, default=3.0,
                   help="scored region: reference or predicted foreground dilated by this many mm (default 3)")
    p.add_argument("--qc-fraction", type=float, default=0.1, help="worst fraction of cases to flag (default 0.1)")
    p.add_argument("--file-ending", default=".nii.gz")
    p.set_defaults(func=_cmd_uncertainty)

    p = sub.add_parser("benchmark", help="DiffusionTrainer vs nnUNetTrainer: iteration time, memory, prediction, Dice")
    p.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier, e.g. nnUNetResEncUNetMPlans (default nnUNetPlans)")
    p.add_argument("-tr", default="DiffusionTrainer", help="the diffusion trainer to time against nnUNetTrainer "
                                                          "(default DiffusionTrainer; e.g. DiffusionTrainer_head)")
    p.add_argument("-o", required=True, help="output folder for benchmark.json / benchmark.md")
    p.add_argument("--quick", action="store_true", help="few repeats, no Dice training (minutes on a CPU)")
    p.add_argument("--budget", default=None, help="EPOCHSxITERS for the Dice comparison (default 5x50)")
    p.add_argument("--repeats", type=int_in_range("--repeats", 1), default=None, help="timed iterations per trainer")
    p.add_argument("-device", dest="device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("release", help="a trained model as a compact zip for nnUNetv2_install_pretrained_model_from_zip: "
                                       "weights only, with a SHA-256 checked whenever they are loaded")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-f", default="all", help="the fold to release (default all)")
    p.add_argument("-tr", default="DiffusionTrainer", help="trainer (default DiffusionTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint (default checkpoint_final.pth)")
    p.add_argument("-o", required=True, help="the zip to write (with OUT.sha256 beside it)")
    p.add_argument("--half", action="store_true", help="store floating-point weights as float16 (half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing zip")
    p.add_argument("--as-fold", default=None, help="fold name of the installed model (default: -f)")
    p.add_argument("--as-trainer", default=None,
                   help="trainer name of the installed model, e.g. DiffusionTrainer for a DiffusionTrainer_30ep100it "
                        "run (default: -tr)")
    p.set_defaults(func=_cmd_release)

    p = sub.add_parser("experiment", help="train and compare the paper's Table 1 or Table 2 under one budget")
    p.add_argument("table", choices=["table1", "table2"])
    p.add_argument("-d", required=True, help="dataset name or id (planned for 2d and 3d_fullres)")
    p.add_argument("--folds", type=int, nargs="+", default=[0], help="folds to train (default 0)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier, e.g. nnUNetResEncUNetMPlans (default nnUNetPlans)")
    p.add_argument("--budget", default="10x50", help="EPOCHSxITERS for every trainer (default 10x50)")
    p.add_argument("-device", dest="device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("-o", default=None, help="report folder (default nnUNet_results/DATASET/experiments/TABLE_BUDGET)")
    p.add_argument("--jobs", type=int_in_range("--jobs", 1, 64), default=1,
                   help="runs that train at the same time (default 1); each still gets the full budget")
    p.set_defaults(func=_cmd_experiment)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"nnunet-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
