"""Train and release the example Hippocampus model the demo uses (``models/``).

    python benchmarks/train_release.py --budget 30x100 --batch-size 2 -device cpu      # ~4 h on 2 CPU cores
    python benchmarks/train_release.py --budget 100x100 -device cuda                   # a GPU, planned batch size

Needs nnUNet_raw/_preprocessed/_results set and ``Dataset004_Hippocampus`` in nnUNet_raw (as for the accuracy
study). Steps, resumable (a finished step is skipped, an interrupted training continues with ``--c``):

1. plan and preprocess Dataset004 (3d_fullres) if needed; ``--batch-size`` overrides the planned batch size
   (the same edit as the accuracy study's; without it the plans are left as they are);
2. add split 5 to nnU-Net's ``splits_final.json``: training = all 208 cases except the demo's 6 held-out
   ones (``DEMO_HELD_OUT``), validation = those 6 (folds 0-4 are left as they are);
3. ``nnUNetv2_train 4 3d_fullres 5 -tr <trainer>_<E>ep<I>it``: nnU-Net's final validation (mirroring, the
   trainer's own output) is then the Dice on the demo's held-out cases;
4. ``nnunet-diffusion release --half --as-fold all --as-trainer <trainer>`` into ``-o`` (default
   ``models/Dataset004_Hippocampus_DiffusionTrainer.zip``), with a ``README.md`` beside it: training command,
   budget, machine, versions, date, the held-out Dice per case, the weights' and the file's SHA-256.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from accuracy_protocol import train
from study_lib import CONFIG, DATASET, DATASET_ID, REPO_ROOT, prepare, summary_dice

DEMO_HELD_OUT = [f"hippocampus_{i:03d}" for i in range(48, 54)]  # data/Dataset504_HippocampusDemo/imagesTs
SPLIT = 5



def add_release_split(splits_file: str, cases) -> None:
    """Split ``SPLIT`` of ``splits_file``: every case but the demo's held-out ones for training, those for
    validation. Refuses a file whose split 5 is something else."""
    val = sorted(DEMO_HELD_OUT)
    missing = [c for c in val if c not in cases]
    if missing:
        raise ValueError(f"the dataset lacks the demo's held-out cases {missing}")
    splits = json.load(open(splits_file))
    want = {"train": sorted(c for c in cases if c not in val), "val": val}
    if len(splits) > SPLIT:
        have = {k: sorted(v) for k, v in splits[SPLIT].items()}
        if have != want:
            raise ValueError(f"{splits_file} already has a split {SPLIT} that is not the release split; "
                             "move it away or use another nnUNet_preprocessed")
        return
    if len(splits) != SPLIT:
        raise ValueError(f"{splits_file} has {len(splits)} splits, expected nnU-Net's 5")
    splits.append(want)
    tmp = splits_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(splits, f, indent=1)
    os.replace(tmp, splits_file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="30x100", help="EPOCHSxITERS (default 30x100)")
    ap.add_argument("--batch-size", type=int, default=None, help="override the planned batch size (CPU: 2)")
    ap.add_argument("--trainer", default="DiffusionTrainer")
    ap.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("-o", default=os.path.join(REPO_ROOT, "models", "Dataset004_Hippocampus_DiffusionTrainer.zip"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing release zip")
    args = ap.parse_args(argv)

    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    from nnunet_diffusion.budget import budget_name, parse_budget
    from nnunet_diffusion.machine import describe, machine_info
    from nnunet_diffusion.release import release_model

    if os.path.exists(args.o) and not args.overwrite:
        ap.error(f"{args.o} exists; pass --overwrite to replace it")
    epochs, iters = parse_budget(args.budget)
    out_dir = os.path.dirname(os.path.abspath(args.o))
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    pre = os.path.join(str(nnUNet_preprocessed), DATASET)
    if args.batch_size is not None:
        prepare(args.batch_size, os.path.join(logs, "prepare.log"))
    elif not os.path.isfile(os.path.join(pre, "nnUNetPlans.json")):
        ap.error(f"{DATASET} is not planned: run nnUNetv2_plan_and_preprocess -d {DATASET_ID} -c {CONFIG}, "
                 "or pass --batch-size")
    splits_file = os.path.join(pre, "splits_final.json")
    if not os.path.isfile(splits_file):
        ap.error(f"no {splits_file}: train any fold once (nnU-Net writes it) or copy the accuracy study's")
    first = json.load(open(splits_file))[0]
    cases = sorted(first["train"] + first["val"])
    add_release_split(splits_file, cases)

    trainer = budget_name(args.trainer, epochs, iters)
    t0 = time.time()
    info = train(trainer, SPLIT, args.device, out_dir)
    model = os.path.join(str(nnUNet_results), DATASET, f"{trainer}__nnUNetPlans__{CONFIG}")
    summary_file = os.path.join(model, f"fold_{SPLIT}", "validation", "summary.json")
    summary = json.load(open(summary_file))
    per_case = summary_dice(summary_file)
    machine = machine_info(args.device)
    notes = {"training_command": info["command"], "budget": {"epochs": epochs, "iterations": iters,
                                                             "batch_size": args.batch_size or "planned"},
             "training_s": info["training_s"], "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "held_out_cases": DEMO_HELD_OUT, "held_out_dice": per_case,
             "held_out_mean_dice": summary["foreground_mean"]["Dice"],
             "evaluation": "nnU-Net's final validation of the training run (its mirroring, the trainer's output)"}
    rel = release_model(model, str(SPLIT), args.o, half=True, notes=notes, overwrite=args.overwrite, as_fold="all",
                        as_trainer=args.trainer)
    name = os.path.basename(args.o)
    lines = [f"# {name}", "",
             f"`{args.trainer}` on Dataset004_Hippocampus ({CONFIG}), trained on all 208 cases except the demo's 6 "
             f"held-out ones ({', '.join(DEMO_HELD_OUT)}), released as fold `all`.", "",
             f"* training: `{info['command']}` (split {SPLIT} of splits_final.json, added by "
             f"`benchmarks/train_release.py`), {epochs} epochs x {iters} iterations at batch "
             f"{args.batch_size or 'as planned'}, {info['training_s'] / 3600:.2f} h of epochs; "
             f"{describe(args.device, machine)} (released {notes['date']})",
             f"* Dice on the 6 held-out cases (nnU-Net's validation: mirroring, the trainer's output): mean "
             f"{notes['held_out_mean_dice']:.4f}; " + ", ".join(f"{c} {d:.3f}" for c, d in sorted(per_case.items())),
             f"* weights: float16, SHA-256 of the weights `{rel['weights_sha256']}` (checked on every load); "
             f"file SHA-256 in `{name}.sha256`; {rel['zip_bytes'] / 2**20:.1f} MiB",
             f"* command: `python benchmarks/train_release.py {' '.join(argv or sys.argv[1:])}` "
             f"({time.time() - t0:.0f} s in this call)", "",
             "Install and predict:", "", "```bash",
             f"nnUNetv2_install_pretrained_model_from_zip models/{name}",
             "nnUNetv2_predict_diffusion -i IMAGES -o OUT -d 4 -c 3d_fullres -f all -tr DiffusionTrainer "
             "--num-samples 4 --uncertainty", "```"]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
