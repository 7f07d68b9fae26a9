"""Batched mirroring against one network call per mirroring, on a trained model (not a test).

    python benchmarks/mirror_batch.py MODEL_DIR IMAGES_DIR -o results/.../mirror_batch.json [--cases 4] [-device cpu]

For ``--tta full`` and ``final``, every case is predicted with ``mirror_batch`` None (all mirrored copies of a
step in one call) and 1 (one call per copy), alternating the order per case (ABBA) after one warm-up case;
reports the median seconds per case of each, their ratio, and the largest absolute difference of the logits
(the two must agree up to floating-point rounding).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("images")
    ap.add_argument("-o", required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("-device", default="cpu")
    args = ap.parse_args(argv)

    from nnunet_diffusion.machine import machine_info
    from nnunet_diffusion.predictor import DiffusionPredictor
    device = torch.device(args.device)
    files = sorted(glob.glob(os.path.join(args.images, "*_0000.nii.gz")))[:args.cases + 1]
    if len(files) < 2:
        raise SystemExit(f"need at least 2 cases in {args.images}")
    predictors = {}
    for tta in ("full", "final"):
        for mb in (None, 1):
            p = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, tta=tta,
                                   mirror_batch=mb, perform_everything_on_device=device.type == "cuda",
                                   device=device, verbose=False, allow_tqdm=False)
            p.initialize_from_trained_model_folder(args.model_dir, (args.fold,), "checkpoint_final.pth")
            predictors[(tta, mb)] = p
    first = predictors[("full", None)]
    pp = first.configuration_manager.preprocessor_class(verbose=False)
    data = [torch.from_numpy(pp.run_case([f], None, first.plans_manager, first.configuration_manager,
                                         first.dataset_json)[0]).float() for f in files]
    result = {"model": os.path.abspath(args.model_dir), "cases": [os.path.basename(f) for f in files[1:]],
              "device": args.device, "machine": machine_info(args.device), "modes": {}}
    for tta in ("full", "final"):
        a, b = predictors[(tta, None)], predictors[(tta, 1)]
        a.predict_sliding_window_return_logits(data[0])  # warm-up
        b.predict_sliding_window_return_logits(data[0])
        times = {"batched": [], "one_per_call": []}
        max_diff = 0.0
        for i, d in enumerate(data[1:]):
            order = [("batched", a), ("one_per_call", b)]
            if i % 2:
                order.reverse()
            out = {}
            for name, p in order:
                t0 = time.perf_counter()
                out[name] = p.predict_sliding_window_return_logits(d).float()
                times[name].append(time.perf_counter() - t0)
            max_diff = max(max_diff, float((out["batched"] - out["one_per_call"]).abs().max()))
        med = {k: statistics.median(v) for k, v in times.items()}
        result["modes"][tta] = {"seconds": times, "median_s": med,
                                "ratio_batched_to_one_per_call": med["batched"] / med["one_per_call"],
                                "max_abs_logit_difference": max_diff}
        print(f"{tta}: batched {med['batched']:.2f} s, one per call {med['one_per_call']:.2f} s "
              f"(ratio {med['batched'] / med['one_per_call']:.2f}), max |diff| {max_diff:.2e}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.o)), exist_ok=True)
    with open(args.o, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.o}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
