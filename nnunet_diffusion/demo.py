"""The demo: train DiffusionTrainer briefly on bundled Hippocampus cases, predict held-out cases.

Run ``python -m nnunet_diffusion.demo`` (or ``bash demo.sh``, which also installs). Everything
lives under ``--out`` (default ``demo_output/``); no environment variables are needed.
Steps: nnUNetv2_plan_and_preprocess -> DiffusionTrainer for a short budget (nnU-Net's own
training loop) -> nnUNetv2_predict on the held-out cases -> Dice per case -> PNG of one slice.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(os.path.dirname(HERE), "data", "Dataset504_HippocampusDemo")
DATASET = "Dataset504_HippocampusDemo"


def _bin(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


def _run(cmd, env) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, labels) -> list[float]:
    out = []
    for c in labels:
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out.append(float(2 * (p & r).sum() / denom) if denom else 1.0)
    return out


def save_slice_png(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    z = int(np.argmax((ref > 0).sum(axis=(1, 2))))  # the slice with the most foreground
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    cmap = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.95, 0.3, 0.2, 0.6), (0.2, 0.6, 1.0, 0.6)])
    for ax, (name, seg) in zip(axes, [("image", None), ("ground truth", ref), ("DiffusionTrainer", pred)]):
        ax.imshow(image[z], cmap="gray")
        if seg is not None:
            ax.imshow(seg[z], cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="working folder (default: demo_output)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="raw dataset folder (nnU-Net layout + imagesTs/labelsTs)")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="overrides the planned batch size to fit a CPU (default 2)")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.iters < 1 or args.batch_size < 1:
        parser.error("--epochs, --iters and --batch-size must be >= 1")
    if not os.path.isfile(os.path.join(args.data, "dataset.json")):
        parser.error(f"no dataset.json in {args.data}")

    from nnunet_diffusion.cli import trainers_path
    start = time.time()
    out = os.path.abspath(args.out)
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(out, "nnUNet_raw"), nnUNet_preprocessed=os.path.join(out, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(out, "nnUNet_results"), nnUNet_extTrainer=trainers_path())
    env.setdefault("nnUNet_def_n_proc", "2")
    raw = os.path.join(env["nnUNet_raw"], DATASET)
    if not os.path.isdir(raw):
        shutil.copytree(args.data, raw)

    # 1. nnU-Net planning and preprocessing (3d_fullres)
    plans_file = os.path.join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json")
    if not os.path.isfile(plans_file):
        _run([_bin("nnUNetv2_plan_and_preprocess"), "-d", "504", "-c", "3d_fullres", "-np", "2"], env)
    plans = json.load(open(plans_file))
    cfg = plans["configurations"]["3d_fullres"]
    if cfg["batch_size"] != args.batch_size:
        print(f"demo: batch size {cfg['batch_size']} -> {args.batch_size} to fit a CPU budget")
        cfg["batch_size"] = args.batch_size
        json.dump(plans, open(plans_file, "w"), indent=1)
    print(f"demo: patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
          f"{len(cfg['architecture']['arch_kwargs']['features_per_stage'])}-stage U-Net")

    # 2. training: nnU-Net's loop with DiffusionTrainer and a short budget
    trainer_name = f"DiffusionTrainer_{args.epochs}ep{args.iters}it"
    env_train = dict(env, nnUNet_n_proc_DA="0", nnUNet_compile="f")
    fold_dir = os.path.join(env["nnUNet_results"], DATASET, f"{trainer_name}__nnUNetPlans__3d_fullres", "fold_0")
    if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
        code = ("import sys, torch\n"
                "from nnunetv2.run.run_training import get_trainer_from_args\n"
                f"t = get_trainer_from_args('504', '3d_fullres', 0, {trainer_name!r}, device=torch.device({args.device!r}))\n"
                "t.run_training()\n")
        print(f"+ nnU-Net training loop: {trainer_name} (fold 0, {args.epochs} epochs x {args.iters} iterations; "
              f"the final cross-validation pass is skipped to save time)", flush=True)
        subprocess.run([sys.executable, "-c", code], env=env_train, check=True)

    # 3. prediction of the held-out cases with the stock command
    pred_dir = os.path.join(out, "predictions")
    _run([_bin("nnUNetv2_predict"), "-i", os.path.join(raw, "imagesTs"), "-o", pred_dir, "-d", "504",
          "-c", "3d_fullres", "-f", "0", "-tr", trainer_name, "-device", args.device, "-npp", "1", "-nps", "1"], env)

    # 4. Dice and a picture
    import SimpleITK as sitk
    labels = [1, 2]
    rows = []
    for f in sorted(os.listdir(os.path.join(raw, "labelsTs"))):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTs", f)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred_dir, f)))
        rows.append((f[:-7], dice_per_class(pred, ref, labels)))
    print(f"\n{'case':<18}{'anterior':>10}{'posterior':>11}{'mean':>8}")
    for case, d in rows:
        print(f"{case:<18}{d[0]:>10.3f}{d[1]:>11.3f}{np.mean(d):>8.3f}")
    mean_fg = float(np.mean([np.mean(d) for _, d in rows]))
    print(f"\nmean foreground Dice on {len(rows)} held-out cases: {mean_fg:.3f}")

    case = rows[0][0]
    img = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "imagesTs", f"{case}_0000.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTs", f"{case}.nii.gz")))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred_dir, f"{case}.nii.gz")))
    png = os.path.join(out, "demo_slice.png")
    save_slice_png(img, ref, pred, png, f"{case}: Dice {np.mean(rows[0][1]):.3f}")
    json.dump({"trainer": trainer_name, "mean_foreground_dice": mean_fg,
               "cases": {c: d for c, d in rows}}, open(os.path.join(out, "demo_results.json"), "w"), indent=1)
    print(f"wrote {png}\ndemo finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
