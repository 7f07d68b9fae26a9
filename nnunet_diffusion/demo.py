"""The demo: train DiffusionTrainer briefly on bundled Hippocampus cases, predict held-out cases.

Run ``python -m nnunet_diffusion.demo`` (or ``bash demo.sh``, which also installs). Everything
lives under ``--out`` (default ``demo_output/``); no environment variables are needed.
Steps: nnUNetv2_plan_and_preprocess -> DiffusionTrainer for a short budget (nnU-Net's own
training loop) -> nnUNetv2_predict on the held-out cases -> nnUNetv2_predict_diffusion with a 4-sample
ensemble and uncertainty maps -> Dice per case -> demo.png (image, ground truth, prediction, entropy, errors).

The short run is the shipped DiffusionTrainer with a budget (``DiffusionTrainer_<E>ep<I>it``) and nothing else
changed. Its default is one epoch: nnU-Net sets the poly learning rate once per epoch, so a single epoch trains
at nnU-Net's initial rate throughout, where 4 epochs of 15 iterations decayed it to 0.003 before the network had
learnt the foreground (Dice 0.000 on a fresh clone). Measured budgets: results/demo_cpu/README.md.
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

from nnunet_diffusion.budget import budget_name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(os.path.dirname(HERE), "data", "Dataset504_HippocampusDemo")
DATASET = "Dataset504_HippocampusDemo"
# the released example model (benchmarks/train_release.py): DiffusionTrainer on Dataset004_Hippocampus without
# the demo's held-out cases; used for the 4-sample step when it is in the checkout
RELEASE = os.path.join(os.path.dirname(HERE), "models", "Dataset004_Hippocampus_DiffusionTrainer.zip")
# the short run's default budget and batch size (measured: results/demo_cpu/README.md)
DEMO_EPOCHS, DEMO_ITERS, DEMO_BATCH = 1, 120, 2
# mean foreground Dice on the held-out cases from which the demo says the short run learnt the task
LEARNT_DICE = 0.5


def _bin(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


def _run(cmd, env) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def _step(k: int, what: str, start: float, starts: dict) -> None:
    """Announce step k of 5 with the time so far; record when it started in ``starts`` (demo_results.json)."""
    starts[f"{k}: {what}"] = round(time.time() - start, 1)
    print(f"\n=== demo step {k}/5 ({time.time() - start:.0f} s so far): {what}", flush=True)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, labels) -> list[float]:
    out = []
    for c in labels:
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out.append(float(2 * (p & r).sum() / denom) if denom else 1.0)
    return out


def save_demo_png(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, entropy: np.ndarray, path: str,
                  title: str) -> int:
    """One axial slice (the one with the most reference foreground) of a case: image, ground truth, prediction,
    the entropy map, and the voxels where prediction and ground truth disagree. Returns the slice index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    z = int(np.argmax((ref > 0).sum(axis=(1, 2))))
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.6))
    labels = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.95, 0.3, 0.2, 0.6), (0.2, 0.6, 1.0, 0.6)])
    wrong = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (1.0, 0.9, 0.1, 0.9)])
    panels = [("image", None, None), ("ground truth", ref, labels), ("prediction (mean of 4 samples)", pred, labels),
              ("entropy (nats)", None, None), ("prediction != ground truth", (pred != ref).astype(np.uint8), wrong)]
    for ax, (name, overlay, cmap) in zip(axes, panels):
        ax.imshow(image[z], cmap="gray")
        if overlay is not None:
            ax.imshow(overlay[z], cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
        if name.startswith("entropy"):
            shown = ax.imshow(entropy[z], cmap="magma", vmin=0, vmax=float(np.log(3)), interpolation="nearest")
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return z


def short_run_trainer(epochs: int, iters: int) -> str:
    """The short run's trainer: the shipped DiffusionTrainer with a budget, nothing else changed."""
    return budget_name("DiffusionTrainer", epochs, iters)


def verdict(mean_dice: float, trainer_name: str, epochs: int, iters: int, batch_size: int,
            n_train: int) -> tuple[bool, str]:
    """Whether the short run learnt the task (mean foreground Dice on the held-out cases >= LEARNT_DICE), and the
    sentence that says so."""
    run = (f"The short run ({trainer_name}: the shipped DiffusionTrainer, {epochs} x {iters} iterations of batch "
           f"{batch_size} on {n_train} cases, fold 0)")
    if mean_dice >= LEARNT_DICE:
        return True, (f"{run} LEARNT the task: mean foreground Dice {mean_dice:.3f} >= {LEARNT_DICE} on the held-out "
                      f"cases. A full nnU-Net budget (1000 x 250 iterations) goes much further.")
    return False, (f"{run} did NOT learn the task well enough: mean foreground Dice {mean_dice:.3f} < {LEARNT_DICE} "
                   f"on the held-out cases. Train longer (e.g. --iters {2 * iters * epochs} --epochs 1) or on a GPU "
                   f"(-device cuda); see results/demo_cpu/README.md.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="working folder (default: demo_output)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="raw dataset folder (nnU-Net layout + imagesTs/labelsTs)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                        help=f"epochs of the short training run (default {DEMO_EPOCHS}: nnU-Net's poly learning rate "
                             f"is set per epoch, so one epoch keeps its initial rate for the whole short run)")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS,
                        help=f"training iterations per epoch (default {DEMO_ITERS})")
    parser.add_argument("--batch-size", type=int, default=DEMO_BATCH,
                        help=f"overrides the planned batch size to fit a CPU (default {DEMO_BATCH})")
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds the short training run (Python, NumPy, PyTorch) for a repeatable run; "
                             "default: unseeded, as nnU-Net")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--release", default=RELEASE,
                        help="released model zip for the 4-sample step (default models/...; when missing, the "
                             "short training run's model is used)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.iters < 1 or args.batch_size < 1:
        parser.error("--epochs, --iters and --batch-size must be >= 1")
    if args.seed is not None and args.seed < 0:
        parser.error("--seed must be >= 0")
    if not os.path.isfile(os.path.join(args.data, "dataset.json")):
        parser.error(f"no dataset.json in {args.data}")

    from nnunet_diffusion.cli import trainers_path
    from nnunet_diffusion.machine import describe, machine_info
    start, starts = time.time(), {}
    out = os.path.abspath(args.out)
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(out, "nnUNet_raw"), nnUNet_preprocessed=os.path.join(out, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(out, "nnUNet_results"), nnUNet_extTrainer=trainers_path())
    env.setdefault("nnUNet_def_n_proc", "2")
    raw = os.path.join(env["nnUNet_raw"], DATASET)
    if not os.path.isdir(raw):
        shutil.copytree(args.data, raw)

    # 1. nnU-Net planning and preprocessing (3d_fullres)
    _step(1, 'planning and preprocessing the training cases (nnUNetv2_plan_and_preprocess)', start, starts)
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
    _step(2, "a short DiffusionTrainer run inside nnU-Net's training loop", start, starts)
    trainer_name = short_run_trainer(args.epochs, args.iters)
    env_train = dict(env, nnUNet_n_proc_DA="0", nnUNet_compile="f", PYTHONUNBUFFERED="1")  # epochs as they end
    fold_dir = os.path.join(env["nnUNet_results"], DATASET, f"{trainer_name}__nnUNetPlans__3d_fullres", "fold_0")
    if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
        code = ("import sys, torch\n"
                + ("" if args.seed is None else
                   f"import random, numpy\nrandom.seed({args.seed}); numpy.random.seed({args.seed}); "
                   f"torch.manual_seed({args.seed})\n")
                + "from nnunetv2.run.run_training import get_trainer_from_args\n"
                f"t = get_trainer_from_args('504', '3d_fullres', 0, {trainer_name!r}, device=torch.device({args.device!r}))\n"
                "t.run_training()\n")
        print(f"+ nnU-Net training loop: {trainer_name} (fold 0, {args.epochs} epoch(s) x {args.iters} iterations, "
              f"batch {args.batch_size}, seed {args.seed}; the final cross-validation pass is skipped to save time)",
              flush=True)
        subprocess.run([sys.executable, "-c", code], env=env_train, check=True)

    # 3. prediction of the held-out cases with the stock command
    _step(3, "predicting the held-out cases with stock nnUNetv2_predict (the short run's model)", start, starts)
    pred_dir = os.path.join(out, "predictions")
    # --disable_tta: mirroring evaluates the K-step chain 8 times per tile; on a CPU that minute goes to training
    _run([_bin("nnUNetv2_predict"), "-i", os.path.join(raw, "imagesTs"), "-o", pred_dir, "-d", "504",
          "-c", "3d_fullres", "-f", "0", "-tr", trainer_name, "-device", args.device, "-npp", "1", "-nps", "1",
          "--disable_tta"], env)

    # 4. the diffusion predictor: a 4-sample ensemble with per-voxel uncertainty (entropy, mutual information),
    # with the released model when there is one (installed by nnU-Net's own command), else the short run's
    _step(4, '4 samples per case with per-voxel uncertainty (nnUNetv2_predict_diffusion)', start, starts)
    model_args, model_label = ["-d", "504", "-f", "0", "-tr", trainer_name], f"the {trainer_name} run"
    if os.path.isfile(args.release):
        from nnunet_diffusion.release import check_zip
        check_zip(args.release)
        print(f"demo: released model {os.path.basename(args.release)} (SHA-256 checked)", flush=True)
        _run([_bin("nnUNetv2_install_pretrained_model_from_zip"), args.release], env)
        model_args, model_label = ["-d", "4", "-f", "all", "-tr", "DiffusionTrainer"], "the released model"
    else:
        print(f"demo: no released model at {args.release}; the 4-sample step uses the short training run", flush=True)
    unc_dir = os.path.join(out, "predictions_uncertainty")
    _run([_bin("nnUNetv2_predict_diffusion"), "-i", os.path.join(raw, "imagesTs"), "-o", unc_dir, *model_args,
          "-c", "3d_fullres", "-device", args.device, "--num-samples", "4", "--uncertainty", "-npp", "1", "-nps", "1"],
         env)

    # 5. Dice, uncertainty and a picture
    _step(5, 'Dice per case and demo.png', start, starts)
    import SimpleITK as sitk

    def read(*parts):
        return sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(*parts)))

    labels = [1, 2]
    rows = []
    for f in sorted(os.listdir(os.path.join(raw, "labelsTs"))):
        case = f[:-7]
        ref = read(raw, "labelsTs", f)
        pred, ens = read(pred_dir, f), read(unc_dir, f)
        ent = read(unc_dir, f"{case}_entropy.nii.gz")
        fg = ens > 0
        rows.append({"case": case, "nnUNetv2_predict": dice_per_class(pred, ref, labels),
                     "diffusion_4_samples": dice_per_class(ens, ref, labels),
                     "mean_entropy_foreground": float(ent[fg].mean()) if fg.any() else 0.0,
                     "wrong_voxels": int((ens != ref).sum())})
    print(f"\nDice per held-out case (anterior / posterior / mean): nnUNetv2_predict with the {trainer_name} run, "
          f"and 4 samples of {model_label} with their uncertainty\n"
          f"{'case':<18}{'nnUNetv2_predict':>24}{'4 samples':>24}{'entropy in fg':>15}")
    for r in rows:
        a, b = r["nnUNetv2_predict"], r["diffusion_4_samples"]
        print(f"{r['case']:<18}{a[0]:>8.3f}{a[1]:>8.3f}{np.mean(a):>8.3f}{b[0]:>8.3f}{b[1]:>8.3f}{np.mean(b):>8.3f}"
              f"{r['mean_entropy_foreground']:>15.3f}")
    mean_fg = float(np.mean([np.mean(r["nnUNetv2_predict"]) for r in rows]))
    mean_ens = float(np.mean([np.mean(r["diffusion_4_samples"]) for r in rows]))
    print(f"\nmean foreground Dice on {len(rows)} held-out cases: nnUNetv2_predict {mean_fg:.3f}, "
          f"nnUNetv2_predict_diffusion --num-samples 4 ({model_label}) {mean_ens:.3f}")
    n_train = len(os.listdir(os.path.join(raw, 'labelsTr')))
    learnt, text = verdict(mean_fg, trainer_name, args.epochs, args.iters, args.batch_size, n_train)
    print("\n" + text + (" The 4-sample column is the released model, trained far longer on other cases: "
                         "models/README.md." if os.path.isfile(args.release) else ""))

    case = rows[0]["case"]
    png = os.path.join(out, "demo.png")
    save_demo_png(read(raw, "imagesTs", f"{case}_0000.nii.gz"), read(raw, "labelsTs", f"{case}.nii.gz"),
                  read(unc_dir, f"{case}.nii.gz"), read(unc_dir, f"{case}_entropy.nii.gz"), png,
                  f"{case}: Dice {np.mean(rows[0]['diffusion_4_samples']):.3f} (4 samples, {model_label})")
    json.dump({"trainer": trainer_name, "budget": {"epochs": args.epochs, "iterations": args.iters,
                                                   "batch_size": args.batch_size}, "seed": args.seed,
               "learnt": learnt, "learnt_threshold": LEARNT_DICE,
               "four_sample_model": model_label, "release": args.release if os.path.isfile(args.release) else None,
               "mean_foreground_dice": mean_fg, "mean_foreground_dice_4_samples": mean_ens, "cases": rows,
               "step_start_s": starts, "total_s": round(time.time() - start, 1),
               "machine": describe(args.device, machine_info(args.device))},
              open(os.path.join(out, "demo_results.json"), "w"), indent=1)
    results = os.path.join(env["nnUNet_results"], DATASET, f"{trainer_name}__nnUNetPlans__3d_fullres")
    print(f"""
demo finished in {time.time() - start:.0f} s. Written:
  {results}   the trained model (nnU-Net's layout)
  {pred_dir}   segmentations from nnUNetv2_predict
  {unc_dir}   segmentations of a 4-sample ensemble, CASE_entropy / CASE_mutual_info uncertainty maps
  {png}   image, ground truth, prediction, entropy and errors for {case}
  {os.path.join(out, "demo_results.json")}   Dice per case and the mean entropy over the predicted foreground
Next, on your own nnU-Net dataset (nnUNet_raw / nnUNet_preprocessed / nnUNet_results set as for nnU-Net):
  export nnUNet_extTrainer=$(nnunet-diffusion trainers-path)
  nnUNetv2_train DATASET 3d_fullres 0 -tr DiffusionTrainer
  nnUNetv2_predict_diffusion -i IMAGES -o OUT -d DATASET -c 3d_fullres -f 0 --num-samples 4 --uncertainty""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
