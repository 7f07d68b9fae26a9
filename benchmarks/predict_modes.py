"""TTA modes and tile-consistent noise, measured on a trained model (not a test; prints a table).

    python benchmarks/predict_modes.py MODEL_DIR IMAGES_DIR LABELS_DIR [--fold 0] [--device cpu]

MODEL_DIR is an nnU-Net results folder (``.../DiffusionTrainer__nnUNetPlans__3d_fullres``).
1. Every case of IMAGES_DIR is predicted with ``--tta full``, ``chain`` and ``off`` and with stock
   ``nnUNetPredictor`` semantics for the same network (= ``full``): foreground Dice and seconds per case.
2. Seams: pairs of cases are stacked along the first axis into volumes larger than the patch, so the
   sliding window has overlapping tiles. Each is predicted with voxel-attached (tile-consistent) noise and
   with independent noise per tile; reported: mean |p_i - p_j| between the softmax outputs of overlapping
   tiles in their overlap, and the Dice of the stitched result.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_diffusion.predictor import DiffusionPredictor


def dice_fg(pred, ref, labels):
    out = []
    for c in labels:
        p, r = pred == c, ref == c
        out.append(2 * (p & r).sum() / max(1, p.sum() + r.sum()))
    return float(np.mean(out))


class Recording(DiffusionPredictor):
    """Keeps every tile's softmax output with its slicer (to measure disagreement in overlaps)."""

    def _internal_maybe_mirror_and_predict(self, x):
        logits = super()._internal_maybe_mirror_and_predict(x)
        self.tiles.append((self._slicers[self._tile_index - 1][1:], torch.softmax(logits.float(), 1)[0].cpu()))
        return logits


def make(model_dir, fold, device, **kw):
    p = Recording(tile_step_size=0.5, use_gaussian=True, use_mirroring=kw.pop("mirror", True),
                  perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                  allow_tqdm=False, **kw)
    p.initialize_from_trained_model_folder(model_dir, (fold,), "checkpoint_final.pth")
    p.tiles = []
    return p


def overlap_disagreement(tiles):
    diffs = []
    for (sa, pa), (sb, pb) in itertools.combinations(tiles, 2):
        inter = [slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sa, sb)]
        if any(s.start >= s.stop for s in inter):
            continue
        la = tuple(slice(s.start - a.start, s.stop - a.start) for s, a in zip(inter, sa))
        lb = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(inter, sb))
        diffs.append(float((pa[(slice(None), *la)] - pb[(slice(None), *lb)]).abs().mean()))
    return float(np.mean(diffs)) if diffs else float("nan"), len(diffs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("images")
    ap.add_argument("labels")
    ap.add_argument("--fold", default="0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fold = args.fold if args.fold == "all" else int(args.fold)
    device = torch.device(args.device)
    images = sorted(glob.glob(os.path.join(args.images, "*_0000.nii.gz")))
    cases = [(os.path.basename(f)[:-12], f) for f in images]
    labels = [1, 2]
    read = lambda f: sitk.GetArrayFromImage(sitk.ReadImage(f))  # noqa: E731

    print(f"1. TTA modes on {len(cases)} case(s), {device}")
    rows = {}
    for mode in ("full", "chain", "off"):
        pred = make(args.model_dir, fold, device, tta=mode, seed=args.seed, mirror=mode != "off")
        dices, times = [], []
        for name, f in cases:
            img = sitk.ReadImage(f)
            arr = sitk.GetArrayFromImage(img)[None].astype(np.float32)
            props = {"spacing": list(reversed(img.GetSpacing()))}
            t0 = time.perf_counter()
            seg = pred.predict_single_npy_array(arr, props, None, None, False)
            times.append(time.perf_counter() - t0)
            dices.append(dice_fg(seg, read(os.path.join(args.labels, f"{name}.nii.gz")), labels))
        rows[mode] = (float(np.mean(dices)), float(np.median(times)))
        print(f"   tta {mode:5s}: Dice {rows[mode][0]:.4f}, {rows[mode][1]:.2f} s/case")
    full_t = rows["full"][1]
    print("   | mode | mean foreground Dice | s / case | time ratio to full (= stock mirroring) |")
    print("   |---|---|---|---|")
    for mode, (d, t) in rows.items():
        print(f"   | {mode} | {d:.4f} | {t:.2f} | {t / full_t:.2f} |")

    print("2. Seams: stacked pairs of cases, overlapping tiles")
    pairs = [(cases[i], cases[i + 1]) for i in range(0, len(cases) - 1, 2)]
    for consistent in (True, False):
        dis, dices, n = [], [], 0
        for (na, fa), (nb, fb) in pairs:
            a, b = read(fa), read(fb)
            la, lb = read(os.path.join(args.labels, f"{na}.nii.gz")), read(os.path.join(args.labels, f"{nb}.nii.gz"))
            shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]
            pad = lambda v: np.pad(v, [(0, 0)] + [(0, s - d) for s, d in zip(shape, v.shape[1:])])  # noqa: E731
            vol = np.concatenate([pad(a), pad(b)], 0)[None].astype(np.float32)
            ref = np.concatenate([pad(la), pad(lb)], 0)
            pred = make(args.model_dir, fold, device, tta="chain", seed=args.seed, tile_consistent_noise=consistent)
            seg = pred.predict_single_npy_array(vol, {"spacing": [1.0, 1.0, 1.0]}, None, None, False)
            d, k = overlap_disagreement(pred.tiles)
            dis.append(d)
            n += k
            dices.append(dice_fg(seg, ref, labels))
        name = "voxel-attached noise" if consistent else "independent noise per tile"
        print(f"   {name:28s}: overlap disagreement {np.mean(dis):.4f} (mean |p_i - p_j|, {n} tile pairs), "
              f"Dice {np.mean(dices):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
