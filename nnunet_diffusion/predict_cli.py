"""``nnUNetv2_predict_diffusion``: every ``nnUNetv2_predict`` argument plus the sampler's."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from nnunet_diffusion.options import int_in_range
from nnunet_diffusion.schedule import NUM_BASE_LEVELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_predict_diffusion",
        description="nnUNetv2_predict for diffusion trainers, with seeded sampling, sample ensembles, uncertainty "
                    "maps and mirroring folded into the chain. All nnUNetv2_predict arguments work the same.")
    p.add_argument("-i", required=True, help="input folder (files CASE_XXXX.ext as for nnUNetv2_predict)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", default="DiffusionTrainer", help="trainer (default DiffusionTrainer)")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-f", nargs="+", default=(0, 1, 2, 3, 4), help="folds (default 0 1 2 3 4)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (same as --tta off)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save_probabilities", action="store_true",
                   help="save the (mean over samples) probabilities as nnU-Net does")
    p.add_argument("--continue_prediction", action="store_true", help="do not overwrite existing predictions")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-npp", type=int_in_range("-npp", 0), default=3)
    p.add_argument("-nps", type=int_in_range("-nps", 0), default=3)
    p.add_argument("-prev_stage_predictions", default=None)
    p.add_argument("-num_parts", type=int_in_range("-num_parts", 1), default=1)
    p.add_argument("-part_id", type=int_in_range("-part_id", 0), default=0)
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true")
    g = p.add_argument_group("diffusion sampling")
    g.add_argument("--steps", type=int_in_range("--steps", 1, NUM_BASE_LEVELS), default=None,
                   help=f"levels K' of the sampling chain, 1 ... {NUM_BASE_LEVELS} (default: the trained K). The "
                        "network is conditioned on base levels, so any K' works; more steps cost more time.")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="default: the trained sampler (ddpm)")
    g.add_argument("--seed", type=int_in_range("--seed", 0), default=0,
                   help="noise seed; same seed, model, input and device give bit-identical files (default 0)")
    g.add_argument("--num-samples", type=int_in_range("--num-samples", 1), default=1,
                   help="independent chains per case; the segmentation is the argmax of their mean probabilities")
    g.add_argument("--uncertainty", action="store_true",
                   help="write CASE_entropy and CASE_mutual_info beside CASE (use with --num-samples >= 2)")
    g.add_argument("--average-last", type=int_in_range("--average-last", 1, NUM_BASE_LEVELS), default=None,
                   help="m: the output is the mean probability of the last m steps' x0_hat (default: all K' steps, "
                        "measured best in the prediction study; 1 = the last step's logits, the paper and nnU-Net's "
                        "own validation)")
    g.add_argument("--start", choices=["noise"], default=None,
                   help="what the chain starts from: noise, x_K ~ N(0, I) (the only start since the zero start left "
                        "with its trainer; kept so that scripts passing it still run)")
    g.add_argument("--save-steps", action="store_true",
                   help="also write the segmentation of every step's x0_hat: CASE_step{K}..CASE_step1 (step K is "
                        "the first call, from pure noise)")
    g.add_argument("--tta", choices=["full", "final", "chain", "off", "sample"], default="chain",
                   help="network calls per tile with K steps and M mirrorings (M = 8 in 3D): full K*M, nnU-Net's "
                        "mirroring around whole chains; final K-1+M, each step another mirroring and the last "
                        "step under all M; chain K, each step another mirroring; off K, no mirroring; sample K per "
                        "sample, sample i under mirroring i mod M for its whole chain (use with --num-samples N: "
                        "a noise and mirror ensemble at N*K calls). Default chain (with --average-last = all steps, "
                        "every mirrored call contributes to the output): the prediction study's rule picked it on "
                        "the default DiffusionTrainer's model (README, Results)")
    g.add_argument("--weights", choices=["average", "raw"], default="average",
                   help="average: the checkpoint's exported weights (for checkpoints of a former default that kept a "
                        "moving average of the weights, that average); raw: the trained weights such a checkpoint "
                        "keeps beside it (default average)")
    g.add_argument("--mirror-batch", type=int_in_range("--mirror-batch", 1), default=None,
                   help="mirrored copies of a tile per network call in full/final (default: all M at once, "
                        "halved automatically when memory runs out; 1: one call per mirroring)")
    return p


def check_inputs(input_folder: str, dataset_json: dict) -> None:
    """Refuse an input folder whose cases do not have the model's channel files or hold NaN/Inf values."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    if not os.path.isdir(input_folder):
        raise ValueError(f"input folder {input_folder} does not exist")
    ending = dataset_json["file_ending"]
    expected = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    cases = create_lists_from_splitted_dataset_folder(input_folder, ending)
    if not cases:
        raise ValueError(f"no images ending in {ending} in {input_folder}")
    for files in cases:
        if len(files) != expected:
            case = os.path.basename(files[0])[:-(len(ending) + 5)]
            raise ValueError(f"case {case} has {len(files)} channel file(s) but the model expects {expected} "
                             f"({', '.join(dataset_json['channel_names'].values())}): "
                             f"{', '.join(os.path.basename(f) for f in files)}")
    for files in cases:
        for f in files:
            bad = _count_non_finite(f)
            if bad:
                raise ValueError(f"{os.path.basename(f)} holds {bad} NaN/Inf voxel(s); nnU-Net's normalisation "
                                 f"would spread them over the whole case. Replace them (e.g. with the image "
                                 f"minimum) before predicting.")


def _count_non_finite(path: str) -> int:
    """NaN/Inf voxels in an image file. NIfTI is read with nibabel because ITK's NIfTI reader silently turns
    NaN into 0 (SimpleITK 2.5); other formats with SimpleITK. Formats neither reads are not checked."""
    import numpy as np
    if path.endswith((".nii", ".nii.gz")):
        import nibabel
        values = np.asanyarray(nibabel.load(path).dataobj)
    elif path.endswith((".nrrd", ".mha", ".mhd", ".tif", ".tiff", ".png")):
        import SimpleITK as sitk
        values = sitk.GetArrayFromImage(sitk.ReadImage(path))
    else:
        return 0
    if not np.issubdtype(values.dtype, np.floating):
        return 0
    return int((~np.isfinite(values)).sum())


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_diffusion.predictor import DiffusionPredictor
    from nnunet_diffusion.checkpoint import read_checkpoint

    folds = [f if f == "all" else int(f) for f in args.f]
    if args.part_id >= args.num_parts:
        print(f"error: -part_id ({args.part_id}) must be smaller than -num_parts ({args.num_parts})", file=sys.stderr)
        return 2
    if (args.uncertainty or args.save_steps) and args.npp == 0 and args.nps == 0:
        print("error: --uncertainty/--save-steps need -npp/-nps > 0 (the sequential mode exports no extra maps)",
              file=sys.stderr)
        return 2
    try:
        model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
        if not os.path.isdir(model_folder):
            raise ValueError(f"no trained model in {model_folder}")
        check_inputs(args.i, load_json(os.path.join(model_folder, "dataset.json")))
        device = torch.device(args.device)
        if args.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        predictor = DiffusionPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                       use_mirroring=not args.disable_tta and args.tta != "off",
                                       perform_everything_on_device=not args.not_on_device, device=device,
                                       verbose=args.verbose, verbose_preprocessing=args.verbose,
                                       allow_tqdm=not args.disable_progress_bar, steps=args.steps,
                                       sampler=args.sampler, seed=args.seed, num_samples=args.num_samples,
                                       uncertainty=args.uncertainty,
                                       # the measured default: the mean probability of every step's x0_hat
                                       average_last="all" if args.average_last is None else args.average_last,
                                       save_steps=args.save_steps, tta="off" if args.disable_tta else args.tta,
                                       mirror_batch=args.mirror_batch, weights=args.weights)
        for f in folds:
            read_checkpoint(os.path.join(model_folder, f"fold_{f}", args.chk))
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.o, exist_ok=True)
    if args.npp == 0 and args.nps == 0:
        predictor.predict_from_files_sequential(args.i, args.o, save_probabilities=args.save_probabilities,
                                                overwrite=not args.continue_prediction,
                                                folder_with_segs_from_prev_stage=args.prev_stage_predictions)
    else:
        predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities,
                                     overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                     num_processes_segmentation_export=args.nps,
                                     folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                     num_parts=args.num_parts, part_id=args.part_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
